"""A `fabula create` killed part-way leaves state that the next `create` finishes and that
`destroy` removes completely."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.e2e.local.conftest import ENV, Environment, leftovers, prepared_environment
from tests.helpers import fabula_argv, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def fresh():
    with prepared_environment("crash", servers="{web: 1, worker: 1, cache: 1, db-primary: 1, db-replica: 0}") as env:
        yield env


def kill_create_once(env: Environment, marker: Path) -> None:
    """Start `fabula create` and SIGKILL it as soon as `marker` exists (mid-create)."""
    proc = subprocess.Popen([*fabula_argv(), "create", ENV], cwd=env.app_dir, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "FABULA_STATE_DIR": str(env.state_dir)})
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, timeout=120, interval=0.05,
                 message=f"{marker} to appear")
        assert proc.poll() is None, "create finished before it could be interrupted"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_create_killed_midway_is_finished_by_the_next_create(fresh):
    # killed while PostgreSQL is being initialised on db1
    kill_create_once(fresh, fresh.env_dir / "servers" / "db1" / "data" / "postgresql.partial")
    again = fresh.fabula("create", ENV, timeout=600)
    assert again.returncode == 0, again.stderr
    with httpx.Client(verify=False, timeout=10) as http:
        assert http.post(fresh.url + "/api/entries", data={"text": "after crash"}).status_code == 201


def test_destroy_after_a_create_killed_midway_leaves_nothing(fresh):
    # killed once Redis runs on the cache server, while other servers are still being set up
    kill_create_once(fresh, fresh.env_dir / "servers" / "cache1" / "log" / "redis.log")
    result = fresh.fabula("destroy", ENV, "--yes")
    assert result.returncode == 0, result.stderr
    assert "taking over the stale lock" in result.stderr  # the killed create's: no unlock needed
    assert leftovers(fresh) == []
    # the history outlives the environment: the killed create, then the destroy
    records = json.loads(fresh.fabula("history", ENV, "--json").stdout)
    assert [(r["action"], r["outcome"]) for r in records[-2:]] == [("create", "interrupted"), ("destroy", "ok")]
