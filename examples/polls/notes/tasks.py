from celery import shared_task
from django.conf import settings

from .models import TaskRecord


@shared_task(bind=True, name="notes.tasks.record_text")
def record_text(self, text):
    """Record that this worker ran the task.

    get_or_create on the task id makes a redelivery (acks_late: a task whose
    worker died is run again) write nothing new.
    """
    record, _created = TaskRecord.objects.get_or_create(
        task_id=self.request.id,
        defaults={"text": text, "worker": settings.FABULA_SERVER},
    )
    return record.pk
