import time

from celery import shared_task
from django.conf import settings

from .models import Entry, TaskRecord


@shared_task(bind=True, name="notes.tasks.record_text")
def record_text(self, text, seconds=0):
    """Record that this worker ran the task.

    get_or_create on the task id makes a redelivery (acks_late: a task whose
    worker died is run again) write nothing new. A long task (`seconds`) also
    writes one Entry per execution, "ran <task id>", so runs can be counted.
    """
    if seconds:
        time.sleep(min(float(seconds), 600))
        Entry.objects.create(text=f"ran {self.request.id}"[:200], server=settings.FABULA_SERVER)
    record, _created = TaskRecord.objects.get_or_create(
        task_id=self.request.id,
        defaults={"text": text, "worker": settings.FABULA_SERVER},
    )
    return record.pk
