"""fabula's WSGI entry point on web servers: the app's own WSGI callable, plus /healthcheck.html.

The health check answers here, before Django, so that it does not depend on the app having a
view for it or on ALLOWED_HOSTS; it answers only while gunicorn is serving the app, since the
app's WSGI module is imported when this module is (a broken app fails to boot).
"""
import importlib
import os
import traceback

_module, _, _attribute = os.environ["FABULA_WSGI_APP"].partition(":")
try:
    _app = getattr(importlib.import_module(_module), _attribute or "application")
except BaseException:
    # gunicorn imports this once, in its master (--preload), which logs only the error's message;
    # the traceback (the exception's type, and where it was raised) is what says what to fix
    traceback.print_exc()
    raise

HEALTH_PATH = "/healthcheck.html"
# the same for every release: the health check is reachable from outside, through the load
# balancer, and tells nobody which release runs (`fabula describe` does, from the state)
HEALTH_BODY = b"ok\n"


def application(environ, start_response):
    if environ.get("PATH_INFO") == HEALTH_PATH:
        body = HEALTH_BODY
        start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "no-store"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    return _app(environ, start_response)
