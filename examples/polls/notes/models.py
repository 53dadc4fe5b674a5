from django.db import models


class Entry(models.Model):
    """A line of text written through a web server (POST /api/entries)."""

    text = models.CharField(max_length=200)
    # FABULA_SERVER of the web server that wrote it.
    server = models.CharField(max_length=100, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created", "-id"]
        verbose_name_plural = "entries"

    def __str__(self):
        return self.text

    def as_dict(self):
        return {"id": self.id, "text": self.text, "server": self.server}


class TaskRecord(models.Model):
    """Written by the Celery task notes.tasks.record_text on a worker."""

    task_id = models.CharField(max_length=64, unique=True)
    text = models.CharField(max_length=200)
    # FABULA_SERVER of the worker that ran the task.
    worker = models.CharField(max_length=100, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return f"{self.task_id}: {self.text}"
