"""`fabula release build/list` on a copy of the sample app: real builds (code, virtualenv,
static files), no servers, so no root and a few seconds each."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import free_port, make_app_repo, run_fabula

pytestmark = pytest.mark.e2e
ENV = "ci"


@pytest.fixture
def app(tmp_path):
    # everything lives under tmp_path (the state directory too), which pytest removes
    return make_app_repo(tmp_path / "app", "rel", ENV, free_port(), free_port())


def fabula(app, *args: str):
    return run_fabula(*args, cwd=app, state_dir=app.parent / "state", timeout=300)


def head(app) -> str:
    return subprocess.run(["git", "-C", str(app), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_each_revision_is_built_once_and_listed(app):
    first_commit = head(app)
    first = fabula(app, "release", "build", ENV)
    assert first.returncode == 0, first.stderr
    assert f"release {first_commit[:12]} (commit {first_commit}) built" in first.stdout
    again = fabula(app, "release", "build", ENV, "--rev", "main")
    assert again.returncode == 0, again.stderr
    assert f"release {first_commit[:12]} (commit {first_commit}) already built" in again.stdout

    (app / "polls" / "NOTE").write_text("a second revision\n")
    git = ["git", "-C", str(app), "-c", "user.email=t@fabula.invalid", "-c", "user.name=t"]
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "second"], check=True)
    second = fabula(app, "release", "build", ENV)
    assert second.returncode == 0, second.stderr

    listed = fabula(app, "release", "list", ENV, "--json")
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    assert [r["commit"] for r in report["releases"]] == [first_commit, head(app)]  # newest last
    assert report["group_release"] is None and not any(r["servers"] for r in report["releases"])
    assert all(r["build_seconds"] > 0 for r in report["releases"])

    history = json.loads(fabula(app, "history", ENV, "--json").stdout)
    assert [(r["action"], r["details"]["reused"], r["outcome"]) for r in history] == [
        ("release build", False, "ok"), ("release build", True, "ok"), ("release build", False, "ok")]
