"""Settings for the polls example.

Twelve-factor and strict: everything that differs between deploys comes from
environment variables (see README.md), and what the project needs is read with
os.environ[...], so importing these settings without them fails at once with a
KeyError. fabula provides every one of them wherever the code is imported:
the release build (collectstatic), migrations, `fabula manage`, gunicorn and
Celery.
"""
import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def env(name, default=""):
    """The variable's value, or `default` when it is unset or empty."""
    return os.environ.get(name) or default


def env_bool(name, default=False):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def env_list(name, default=""):
    return [item.strip() for item in env(name, default).split(",") if item.strip()]


# --- fabula ------------------------------------------------------------------
# Set by fabula on every server; shown on the pages and in /api/info.
FABULA_ENVIRONMENT = os.environ["FABULA_ENVIRONMENT"]
FABULA_SERVER = os.environ["FABULA_SERVER"]
FABULA_ROLE = os.environ["FABULA_ROLE"]
FABULA_RELEASE = os.environ["FABULA_RELEASE"]

# --- core --------------------------------------------------------------------
# Every deployed server of one environment gets the same DJANGO_SECRET_KEY.
SECRET_KEY = os.environ["DJANGO_SECRET_KEY"]
DEBUG = env_bool("DJANGO_DEBUG")
ALLOWED_HOSTS = [h.strip() for h in os.environ["DJANGO_ALLOWED_HOSTS"].split(",") if h.strip()]
# Optional, e.g. "https://polls.example.com,https://127.0.0.1:8443" (only needed
# for CSRF-protected form posts over HTTPS; the JSON API is csrf-exempt).
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS")

# nginx terminates TLS and sets X-Forwarded-Proto.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.staticfiles",
    "notes",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "polls.urls"
WSGI_APPLICATION = "polls.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
            ],
        },
    },
]

# --- databases ---------------------------------------------------------------
# DATABASE_URL, e.g. postgres://fb-1a2b3c-app@%2Fsrv%2F...%2Frun%2Fpgbouncer:6432/polls: the
# server's PgBouncer over its Unix socket, no password (peer authentication).
# CONN_MAX_AGE=0: PgBouncer does the pooling, Django closes per request.


def _database(url):
    config = dj_database_url.parse(url, conn_max_age=0)
    if config["ENGINE"] == "django.db.backends.postgresql":
        # Server-side cursors do not survive PgBouncer's transaction pooling.
        config["DISABLE_SERVER_SIDE_CURSORS"] = True
    return config


DATABASES = {
    "default": _database(os.environ["DATABASE_URL"]),
    # a read-only streaming replica (the primary while there is none), used only where a view
    # asks for it with .using("replica"). No router: writes and migrations go to "default";
    # never run migrate against the replica.
    "replica": _database(os.environ["DATABASE_REPLICA_URL"]),
}
# In Django's test runner the replica is the default test database.
DATABASES["replica"]["TEST"] = {"MIRROR": "default"}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- cache and sessions ------------------------------------------------------
REDIS_URL = os.environ["REDIS_URL"]  # e.g. redis://:password@10.213.0.12:6379/0

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "polls",
    }
}
# Sessions live in Redis, shared by every web server.
SESSION_ENGINE = "django.contrib.sessions.backends.cache"

# --- Celery (read by polls/celery.py: CELERY_FOO -> Celery's `foo`) -----------
# RabbitMQ, e.g. amqp://user:pass@10.213.0.12:5672//
CELERY_BROKER_URL = os.environ["CELERY_BROKER_URL"]
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Enqueueing while RabbitMQ is down fails fast with an error the view turns into a 503
# (notes/views.py: tasks): a connection attempt gives up after 2 s, a publish is tried 3 times
# in about 1 s, and a publish waits for RabbitMQ's confirm, so an enqueued task is on disk.
CELERY_BROKER_CONNECTION_TIMEOUT = 2
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5,
                                    "interval_max": 0.5}
CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True}
# No result backend: tasks write their outcome to the database themselves.
CELERY_TASK_IGNORE_RESULT = True
# For local checks only: run tasks inline in the web process.
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER")
CELERY_TASK_EAGER_PROPAGATES = CELERY_TASK_ALWAYS_EAGER

# --- i18n / time -------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- static files ------------------------------------------------------------
# `manage.py collectstatic` copies them to STATIC_ROOT; nginx serves that
# directory at /static/ (Django does not serve static files when DEBUG is off).
STATIC_URL = "/static/"
STATIC_ROOT = os.environ["STATIC_ROOT"]

# --- logging -----------------------------------------------------------------
# Everything to stderr, where gunicorn / celery / systemd pick it up.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
    },
    "handlers": {
        "stderr": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "root": {"handlers": ["stderr"], "level": env("DJANGO_LOG_LEVEL", "INFO")},
    "loggers": {
        # Django's own handlers only print when DEBUG is on; send to stderr always.
        "django": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
    },
}
