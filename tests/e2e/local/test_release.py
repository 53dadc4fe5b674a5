"""`fabula release build/list` on a copy of the sample app: real builds (code, virtualenv,
static files) of an environment that exists (its settings need the environment's addresses and
passwords), as the environment's app user."""
from __future__ import annotations

import json
import os
import pwd
import subprocess

import pytest

from tests.e2e.local.conftest import running_environment
from tests.helpers import commit_files, fabula_argv, run_fabula

pytestmark = pytest.mark.e2e
ENV = "ci"
SMALL = "{web: 1, worker: 0, cache: 1, db-primary: 1, db-replica: 0}"


@pytest.fixture(scope="module")
def environment():
    with running_environment("rel", servers=SMALL) as env:
        yield env


@pytest.fixture
def app(environment):
    return environment.app_dir


def fabula(app, *args: str):
    return run_fabula(*args, cwd=app, state_dir=app.parent / "state", timeout=300)


def head(app) -> str:
    return subprocess.run(["git", "-C", str(app), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_each_revision_is_built_once_and_listed(environment, app):
    first_commit = head(app)
    first = fabula(app, "release", "build", ENV)  # create built it already
    assert first.returncode == 0, first.stderr
    assert f"release {first_commit[:12]} (commit {first_commit}) already built" in first.stdout

    second_commit = commit_files(app, "second", {"polls/NOTE": "a second revision\n"})
    second = fabula(app, "release", "build", ENV)
    assert second.returncode == 0, second.stderr
    assert f"release {second_commit[:12]} (commit {second_commit}) built" in second.stdout
    again = fabula(app, "release", "build", ENV, "--rev", "main")
    assert again.returncode == 0, again.stderr
    assert f"release {second_commit[:12]} (commit {second_commit}) already built" in again.stdout

    listed = fabula(app, "release", "list", ENV, "--json")
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    assert [r["commit"] for r in report["releases"]] == [first_commit, second_commit]  # newest last
    assert report["group_release"] == first_commit[:12]
    assert [r["servers"] for r in report["releases"]] == [["web1"], []]
    assert all(r["build_seconds"] > 0 for r in report["releases"])

    history = json.loads(fabula(app, "history", ENV, "--json").stdout)
    assert [(r["details"]["reused"], r["outcome"]) for r in history if r["action"] == "release build"] == [
        (True, "ok"), (False, "ok"), (True, "ok")]


PROBE = """
import json as _json
if os.environ.get("FABULA_ROLE") == "build":  # the release build imports the settings
    os.makedirs(os.environ["STATIC_ROOT"], exist_ok=True)
    with open(os.path.join(os.environ["STATIC_ROOT"], "probe.json"), "w") as _probe:
        _json.dump({"uid": os.getuid(), "environ": dict(os.environ)}, _probe)
"""


def test_the_build_runs_the_apps_code_as_the_environments_user_with_its_real_settings(environment, app):
    settings = (app / "polls" / "settings.py").read_text()
    commit = commit_files(app, "probe the build", {"polls/settings.py": settings + PROBE})
    # what the operator's shell has must not reach the app's code
    proc = subprocess.run([*fabula_argv(), "release", "build", ENV], cwd=app, capture_output=True, text=True,
                          env={**os.environ, "FABULA_STATE_DIR": str(environment.state_dir),
                               "SUDO_USER": "alice", "GITHUB_TOKEN": "ghp_not_for_the_app",
                               "PATH": "/opt/operator/bin:" + os.environ["PATH"]}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    release_dir = environment.env_dir / "releases" / commit[:12]
    probe = json.loads((release_dir / "static" / "probe.json").read_text())
    assert probe["uid"] == pwd.getpwnam(environment.accounts.app).pw_uid != 0
    seen = probe["environ"]
    for name in ("DATABASE_URL", "DATABASE_REPLICA_URL", "REDIS_URL", "CELERY_BROKER_URL", "DJANGO_SECRET_KEY",
                 "DJANGO_ALLOWED_HOSTS", "STATIC_ROOT", "FABULA_ENVIRONMENT", "FABULA_SERVER", "FABULA_ROLE",
                 "FABULA_RELEASE"):
        assert seen.get(name), f"{name} is missing from the build's environment"
    cache = next(s for s in environment.describe()["servers"] if s["role"] == "cache")
    assert f"@{cache['address']}:6379/" in seen["REDIS_URL"]  # the environment's real values
    assert not {"SUDO_USER", "GITHUB_TOKEN"} & set(seen) and "/opt/operator" not in seen["PATH"]
    # its build log is root's alone (it may show the settings' errors)
    log = environment.env_dir / "releases" / f"{commit[:12]}.build.log"
    assert (log.stat().st_mode & 0o777, log.stat().st_uid) == (0o600, 0)
    # the finished release is root's: the app cannot change its own code
    assert (release_dir / "code" / "manage.py").stat().st_uid == 0
    changed = environment.exec("web1", "runuser", "-u", environment.accounts.app, "--", "touch",
                               str(release_dir / "code" / "manage.py"))
    assert changed.returncode != 0
    # compiled when built, also what the build itself did not import (gunicorn's arbiter, the
    # app's views): the servers, which cannot write into the release, do not compile at each start
    for compiled in ("venv/lib/python3*/site-packages/gunicorn/__pycache__/arbiter.*.pyc",
                     "code/notes/__pycache__/views.*.pyc"):
        assert list(release_dir.glob(compiled)), f"{compiled} is missing from the release"
