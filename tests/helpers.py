"""Helpers shared by the tests: run the real `fabula` CLI, poll for a condition with a deadline."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE_APP = REPO / "examples" / "polls"


def fabula_argv() -> list[str]:
    return [sys.executable, "-m", "fabula"]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def run_fabula(*args: str, cwd: Path, state_dir: Path, timeout: float = 600) -> Run:
    env = {**os.environ, "FABULA_STATE_DIR": str(state_dir)}
    proc = subprocess.run([*fabula_argv(), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    return Run(proc.returncode, proc.stdout, proc.stderr)


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_app_repo(target: Path, project: str, env: str, https_port: int, http_port: int,
                  servers: str = "{web: 2, worker: 1, cache: 1, db-primary: 1, db-replica: 1}",
                  extra: str = "") -> Path:
    """A git repository holding a copy of the sample app, with its own fabula.yml."""
    shutil.copytree(SAMPLE_APP, target, ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3"))
    (target / "fabula.yml").write_text(f"""project: {project}
app:
  source: .
  wsgi: polls.wsgi:application
  settings: polls.settings
  requirements: requirements.txt
  celery: polls.celery:app
environments:
  {env}:
    provider: local
    servers: {servers}
    lb: {{bind: 127.0.0.1, https_port: {https_port}, http_port: {http_port}}}
{extra}""")
    git = ["git", "-C", str(target), "-c", "user.email=tests@fabula.invalid", "-c", "user.name=tests"]
    subprocess.run(git + ["init", "-q", "-b", "main"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "sample app"], check=True)
    return target


def git(repo: Path, *args: str) -> str:
    """A git command in a test's app repository, as a test author; its output."""
    return subprocess.run(["git", "-C", str(repo), "-c", "user.email=tests@fabula.invalid",
                           "-c", "user.name=tests", *args], check=True, capture_output=True, text=True).stdout.strip()


def commit_files(repo: Path, message: str, files: dict[str, str]) -> str:
    """Write `files` (path relative to the repository -> text), commit them; the new commit."""
    for name, text in files.items():
        (repo / name).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")
