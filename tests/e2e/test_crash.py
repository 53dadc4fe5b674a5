"""A `fabula create` killed part-way leaves state that the next `create` finishes and that
`destroy` removes completely."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import destroy_checked, ENV, Environment, leftovers
from tests.helpers import fabula_argv, free_port, make_app_repo, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def fresh():
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests need root (network namespaces)")
    base = Path(tempfile.mkdtemp(prefix="fabula-e2e-", dir="/var/tmp"))
    base.chmod(0o755)
    env = Environment(project=f"crash-{secrets.token_hex(3)}", app_dir=base / "app", state_dir=base / "state",
                      https_port=free_port(), http_port=free_port())
    make_app_repo(env.app_dir, env.project, ENV, env.https_port, env.http_port,
                  servers="{web: 1, worker: 1, cache: 1, db-primary: 1, db-replica: 0}")
    try:
        yield env
    finally:
        try:
            destroy_checked(env)
        finally:
            shutil.rmtree(base, ignore_errors=True)


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
    assert leftovers(fresh) == []
