"""Helpers shared by the tests: the sample app and the real `fabula` CLI (fabula.sample, shared
with the benchmarks), and polling for a condition with a deadline."""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fabula.sample import (
    ALL_ROLES,
    REPO,
    SAMPLE_APP,
    Run,
    SampleEnvironment,
    commit_files,
    fabula_argv,
    free_port,
    git,
    local_keys,
    run_fabula,
)
from fabula.sample import make_app_repo as make_sample_repo

__all__ = ["REPO", "SAMPLE_APP", "Run", "commit_files", "fabula_argv", "free_port", "git", "run_fabula",
           "make_app_repo", "wait_for", "created_environment"]


@contextmanager
def created_environment(project: str, env: str, keys: str, provider: str, servers: str | None = ALL_ROLES,
                        url: str | None = None) -> Iterator[tuple[SampleEnvironment, Run]]:
    """The sample app's environment `env` made with `fabula create` (and what create printed),
    destroyed afterwards, also when the test fails; a failed destroy, or one that leaves the
    environment, fails the test. `keys` and `servers` as make_sample_repo takes them."""
    base = Path(tempfile.mkdtemp(prefix=f"fabula-{project}-", dir="/var/tmp"))
    base.chmod(0o755)
    make_sample_repo(base / "app", project, env, keys, provider=provider, servers=servers)
    environment = SampleEnvironment(base / "app", base / "state", env, url=url)
    try:
        created = environment.fabula("create", env, timeout=900)
        assert created.returncode == 0, f"create failed:\n{created.stdout}\n{created.stderr}"
        yield environment, created
    finally:
        destroyed = environment.fabula("destroy", env, "--yes", timeout=600)
        gone = environment.fabula("describe", env, "--json")
        shutil.rmtree(base, ignore_errors=True)
        if destroyed.returncode != 0 or json.loads(gone.stdout or "{}").get("exists"):
            pytest.fail(f"destroy failed or left the environment: {destroyed.stderr[-2000:]}")


def wait_for(condition, timeout: float, interval: float = 0.2, message: str = "condition"):
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the condition's own failures are retried until the deadline
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"{message} not met within {timeout}s"
                         + (f" (last error: {last_error})" if last_error else ""))


def make_app_repo(target: Path, project: str, env: str, https_port: int, http_port: int,
                  servers: str = ALL_ROLES, extra: str = "") -> Path:
    """The sample app's repository with one environment `env` on the local provider, bound to
    127.0.0.1 on the given ports; `extra` adds keys to the environment (indented four spaces)."""
    return make_sample_repo(target, project, env, local_keys(https_port, http_port) + extra, servers=servers)
