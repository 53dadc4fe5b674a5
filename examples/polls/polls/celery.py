"""Celery application for the polls project (worker: `celery -A polls.celery:app worker`)."""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "polls.settings")

app = Celery("polls")

# Every Django setting named CELERY_* configures Celery (CELERY_BROKER_URL -> broker_url, ...).
app.config_from_object("django.conf:settings", namespace="CELERY")

# Find tasks.py in every installed app (notes.tasks).
app.autodiscover_tasks()
