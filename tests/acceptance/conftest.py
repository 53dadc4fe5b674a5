"""The provider-neutral acceptance suite: what a user observes of an environment, driven only
through the `fabula` CLI, its JSON output and `fabula exec`, never through a provider's internals
(namespaces, paths on this machine). Every provider runs it: the `provider` parameter names it,
and `provider_section` writes that provider's part of fabula.yml. Checks that need one
provider's internals live in that provider's own tests (tests/e2e for local)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import Run, free_port, run_fabula

ENV = "acc"
SAMPLE_APP = Path(__file__).resolve().parents[2] / "examples" / "polls"
PROVIDERS = [p for p in os.environ.get("FABULA_ACCEPTANCE_PROVIDERS", "local").split(",") if p]


def provider_section(provider: str, https_port: int, http_port: int) -> str:
    """The environment's provider-specific keys, as fabula.yml lines (indented for an environment)."""
    if provider == "local":
        return f"    local: {{bind: 127.0.0.1}}\n    lb: {{https_port: {https_port}, http_port: {http_port}}}\n"
    raise ValueError(f"no acceptance set-up for provider {provider!r}")


@dataclass
class Environment:
    """An environment as its user sees it: the CLI, the JSON of `describe`, `exec`, and its URL."""

    app_dir: Path
    state_dir: Path
    name: str = ENV

    def fabula(self, *args: str, timeout: float = 600) -> Run:
        return run_fabula(*args, cwd=self.app_dir, state_dir=self.state_dir, timeout=timeout)

    def describe(self) -> dict:
        result = self.fabula("describe", self.name, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    @property
    def url(self) -> str:
        return self.describe()["url"].rstrip("/")

    def exec(self, server: str, *command: str, timeout: float = 60) -> Run:
        return self.fabula("exec", self.name, server, "--", *command, timeout=timeout)

    def servers(self, role: str | None = None) -> list[dict]:
        return [s for s in self.describe()["servers"] if role is None or s["role"] == role]

    def address(self, server: str) -> str:
        return next(s["address"] for s in self.servers() if s["name"] == server)


@contextmanager
def acceptance_environment(provider: str, servers: str) -> Iterator[Environment]:
    if os.geteuid() != 0:
        pytest.skip("acceptance tests need root")
    base = Path(tempfile.mkdtemp(prefix="fabula-acc-", dir="/var/tmp"))
    base.chmod(0o755)
    app = base / "app"
    shutil.copytree(SAMPLE_APP, app, ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3"))
    project = f"acc-{os.urandom(3).hex()}"
    (app / "fabula.yml").write_text(f"""project: {project}
app:
  source: .
  wsgi: polls.wsgi:application
  settings: polls.settings
  requirements: requirements.txt
  celery: polls.celery:app
environments:
  {ENV}:
    provider: {provider}
    servers: {servers}
""" + provider_section(provider, free_port(), free_port()))
    git = ["git", "-C", str(app), "-c", "user.email=tests@fabula.invalid", "-c", "user.name=tests"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "sample app"]):
        subprocess.run(git + args, check=True)
    env = Environment(app_dir=app, state_dir=base / "state")
    try:
        created = env.fabula("create", ENV, timeout=900)
        assert created.returncode == 0, f"create failed:\n{created.stdout}\n{created.stderr}"
        yield env
    finally:
        destroyed = env.fabula("destroy", ENV, "--yes", timeout=300)
        gone = env.fabula("describe", ENV, "--json")
        shutil.rmtree(base, ignore_errors=True)
        if destroyed.returncode != 0 or json.loads(gone.stdout or "{}").get("exists"):
            pytest.fail(f"destroy failed or left the environment: {destroyed.stderr[-2000:]}")


@pytest.fixture(scope="module", params=PROVIDERS)
def environment(request) -> Iterator[Environment]:
    with acceptance_environment(request.param, "{web: 2, worker: 1, cache: 1, db-primary: 1, db-replica: 1}") as env:
        yield env
