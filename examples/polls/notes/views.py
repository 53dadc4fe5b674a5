import json

from django.conf import settings
from django.core.cache import cache
from django.http import JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods, require_safe
from kombu.exceptions import OperationalError as BrokerUnavailable

from .models import Entry, TaskRecord
from .tasks import record_text

RENDERS_KEY = "index:renders"
TEXT_MAX_LENGTH = 200


def _fabula():
    return {
        "environment": settings.FABULA_ENVIRONMENT,
        "server": settings.FABULA_SERVER,
        "role": settings.FABULA_ROLE,
        "release": settings.FABULA_RELEASE,
    }


def _error(message, status):
    return JsonResponse({"error": message}, status=status)


def _text(request):
    """The `text` form field (or JSON body key), or an error response."""
    text = request.POST.get("text")
    if text is None and request.content_type == "application/json":
        try:
            text = json.loads(request.body or b"{}").get("text")
        except (ValueError, AttributeError):
            text = None
    if not isinstance(text, str) or not text.strip():
        return None, _error("field 'text' is required", 400)
    if len(text) > TEXT_MAX_LENGTH:
        return None, _error(f"field 'text' is longer than {TEXT_MAX_LENGTH} characters", 400)
    return text, None


@require_safe
def index(request):
    visits = request.session.get("visits", 0) + 1
    request.session["visits"] = visits

    # Counted in the shared cache (Redis when REDIS_URL is set).
    cache.add(RENDERS_KEY, 0, timeout=None)
    try:
        renders = cache.incr(RENDERS_KEY)
    except ValueError:  # evicted between add() and incr()
        cache.set(RENDERS_KEY, 1, timeout=None)
        renders = 1

    context = {
        **_fabula(),
        "entry_count": Entry.objects.count(),
        "entries": list(Entry.objects.order_by("-created", "-id")[:5]),
        "visits": visits,
        "renders": renders,
    }
    return render(request, "notes/index.html", context)


@csrf_exempt
@require_http_methods(["GET", "POST"])
def entries(request):
    if request.method == "GET":
        return JsonResponse({"count": Entry.objects.using("default").count()})
    text, error = _text(request)
    if error:
        return error
    entry = Entry.objects.using("default").create(text=text, server=settings.FABULA_SERVER)
    return JsonResponse(entry.as_dict(), status=201)


@csrf_exempt
@require_safe
def entry_detail(request, entry_id):
    db = request.GET.get("db", "default") or "default"
    if db not in ("default", "replica"):
        return _error("db must be 'default' or 'replica'", 400)
    if db not in settings.DATABASES:
        return _error(f"database '{db}' is not configured (DATABASE_REPLICA_URL unset)", 400)
    entry = Entry.objects.using(db).filter(pk=entry_id).first()
    if entry is None:
        return JsonResponse({"error": "not found", "id": entry_id, "db": db}, status=404)
    return JsonResponse(entry.as_dict())


@csrf_exempt
@require_http_methods(["POST"])
def tasks(request):
    text, error = _text(request)
    if error:
        return error
    try:
        seconds = float(request.POST.get("seconds") or 0)
    except ValueError:
        return JsonResponse({"error": "seconds must be a number"}, status=400)
    try:
        # waits for RabbitMQ's confirm (settings: confirm_publish), so a 202 means the task is
        # stored in a durable queue; gives up after the short retry policy of settings.py
        result = record_text.delay(text, seconds)
    except (BrokerUnavailable, OSError):
        # RabbitMQ is down or restarting: the task was not enqueued (there is no local
        # buffer); the client is told so at once and may try again
        response = _error("the task queue is unavailable: the task was not enqueued, try again", 503)
        response["Retry-After"] = "5"
        return response
    return JsonResponse({"task_id": result.id}, status=202)


@csrf_exempt
@require_safe
def task_detail(request, task_id):
    record = TaskRecord.objects.filter(task_id=task_id).first()
    if record is None:
        return JsonResponse({"task_id": task_id, "done": False})
    return JsonResponse(
        {"task_id": record.task_id, "done": True, "worker": record.worker, "text": record.text}
    )


@csrf_exempt
@require_safe
def session(request):
    count = request.session.get("count", 0) + 1
    request.session["count"] = count
    if request.session.session_key is None:
        # Create the session now so the key returned is the one in the cookie.
        request.session.save()
    return JsonResponse(
        {"count": count, "server": settings.FABULA_SERVER, "session_key": request.session.session_key}
    )


@csrf_exempt
@require_safe
def info(request):
    return JsonResponse(_fabula())
