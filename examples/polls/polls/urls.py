from django.urls import path

from notes import views

urlpatterns = [
    path("", views.index, name="index"),
    path("api/entries", views.entries, name="entries"),
    path("api/entries/<int:entry_id>", views.entry_detail, name="entry-detail"),
    path("api/tasks", views.tasks, name="tasks"),
    path("api/tasks/<str:task_id>", views.task_detail, name="task-detail"),
    path("api/session", views.session, name="session"),
    path("api/info", views.info, name="info"),
]
