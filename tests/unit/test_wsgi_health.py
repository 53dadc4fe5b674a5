"""The health check answers before the app (no app code, no ALLOWED_HOSTS) but needs the app loaded."""
from __future__ import annotations

import importlib
import sys
import types

import pytest


@pytest.fixture
def wrapper(monkeypatch):
    calls = []

    def app(environ, start_response):
        calls.append(environ["PATH_INFO"])
        start_response("400 Bad Request", [])
        return [b"DisallowedHost"]

    monkeypatch.setitem(sys.modules, "fake_project_wsgi", types.SimpleNamespace(application=app))
    monkeypatch.setenv("FABULA_WSGI_APP", "fake_project_wsgi:application")
    monkeypatch.setenv("FABULA_RELEASE", "abc123")
    sys.modules.pop("fabula.runtime.fabula_wsgi", None)
    return importlib.import_module("fabula.runtime.fabula_wsgi"), calls


def call(application, path):
    seen = {}
    body = b"".join(application({"PATH_INFO": path, "HTTP_HOST": "evil.example"},
                                lambda status, headers: seen.update(status=status)))
    return seen["status"], body


def test_healthcheck_is_answered_without_the_app(wrapper):
    module, calls = wrapper
    assert call(module.application, "/healthcheck.html") == ("200 OK", b"ok\n")
    assert calls == []


def test_healthcheck_does_not_tell_the_release(wrapper):
    module, _ = wrapper
    assert b"abc123" not in call(module.application, "/healthcheck.html")[1]


def test_other_paths_go_to_the_app(wrapper):
    module, calls = wrapper
    assert call(module.application, "/polls/")[0] == "400 Bad Request"
    assert calls == ["/polls/"]


def test_a_broken_app_fails_at_import(monkeypatch):
    monkeypatch.setenv("FABULA_WSGI_APP", "no_such_module_anywhere:application")
    sys.modules.pop("fabula.runtime.fabula_wsgi", None)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("fabula.runtime.fabula_wsgi")
