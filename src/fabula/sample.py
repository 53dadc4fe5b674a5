"""The sample app (examples/polls) as a user tries it: its own git repository with a fabula.yml,
the real `fabula` CLI run against it, and client load through the load balancer.

The tests (unit, acceptance, e2e) and the benchmarks share this one copy. It needs a source
checkout (the sample app is not packaged) and httpx (the `test` extra); nothing in fabula itself
imports it.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
SAMPLE_APP = REPO / "examples" / "polls"
ALL_ROLES = "{web: 2, worker: 1, cache: 1, db-primary: 1, db-replica: 1}"


# -- the CLI -------------------------------------------------------------------------------------

def fabula_argv() -> list[str]:
    """The real CLI of this virtualenv."""
    return [sys.executable, "-m", "fabula"]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def run_fabula(*args: str, cwd: Path, state_dir: Path, timeout: float = 600) -> Run:
    """`fabula ARGS` in the app's folder, with its own state directory and no terminal."""
    env = {**os.environ, "FABULA_STATE_DIR": str(state_dir)}
    proc = subprocess.run([*fabula_argv(), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    return Run(proc.returncode, proc.stdout, proc.stderr)


class SampleEnvironment:
    """An environment of the sample app as its user sees it: the CLI, `describe`'s JSON, `exec`
    on a server and `db psql`; nothing of a provider's internals."""

    def __init__(self, app_dir: Path, state_dir: Path, name: str, url: str | None = None):
        """`url`: where the load balancer's name leads, when no DNS says (default: `describe`'s)."""
        self.app_dir, self.state_dir, self.name = app_dir, state_dir, name
        self._url: str | None = url

    def fabula(self, *args: str, timeout: float = 600) -> Run:
        return run_fabula(*args, cwd=self.app_dir, state_dir=self.state_dir, timeout=timeout)

    def _checked(self, *args: str) -> str:
        result = self.fabula(*args)
        if result.returncode != 0:
            raise AssertionError(f"`fabula {' '.join(args)}` failed: {result.stderr}")
        return result.stdout

    def describe(self) -> dict:
        return json.loads(self._checked("describe", self.name, "--json"))

    @property
    def url(self) -> str:
        # the load balancer's address is the environment's for its whole life: asked once (a
        # `describe` is a process and a look at every server, seconds in a loop of requests)
        if self._url is None:
            self._url = self.describe()["url"].rstrip("/")
        return self._url

    @property
    def project(self) -> str:
        return self.describe()["project"]

    def exec(self, server: str, *command: str, timeout: float = 60) -> Run:
        return self.fabula("exec", self.name, server, "--", *command, timeout=timeout)

    def servers(self, role: str | None = None) -> list[dict]:
        return [s for s in self.describe()["servers"] if role is None or s["role"] == role]

    def server(self, name: str) -> dict:
        return next(s for s in self.servers() if s["name"] == name)

    def address(self, server: str) -> str:
        return self.server(server)["address"]

    def query(self, sql: str, server: str | None = None) -> str:
        """One query's rows (unaligned, tuples only) from the app's database on `server` (by
        default the primary), through `fabula db psql`."""
        return self._checked("db", "psql", self.name, *([server] if server else []), "--",
                             "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql).strip()


# -- the app's repository --------------------------------------------------------------------------

def git(repo: Path, *args: str) -> str:
    """A git command in a sample app's repository, as a made-up author; its output."""
    return subprocess.run(["git", "-C", str(repo), "-c", "user.email=sample@fabula.invalid",
                           "-c", "user.name=sample", *args], check=True, capture_output=True, text=True).stdout.strip()


def commit_files(repo: Path, message: str, files: dict[str, str]) -> str:
    """Write `files` (path relative to the repository -> text), commit them; the new commit."""
    for name, text in files.items():
        (repo / name).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def local_keys(https_port: int, http_port: int, bind: str = "127.0.0.1") -> str:
    """An environment's keys for the local provider, as fabula.yml lines."""
    return (f"    local: {{bind: {bind}}}\n"
            f"    lb: {{https_port: {https_port}, http_port: {http_port}}}\n")


def make_app_repo(target: Path, project: str, env: str, environment_keys: str, provider: str = "local",
                  servers: str | None = ALL_ROLES) -> Path:
    """A git repository at `target` holding a copy of the sample app, whose fabula.yml declares one
    environment `env`; `environment_keys` are its further keys (lines indented four spaces).
    `servers` None: no `servers:` line (a provider whose servers are its `hosts:`)."""
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
    provider: {provider}
{"" if servers is None else f"    servers: {servers}{chr(10)}"}{environment_keys}""")
    git(target, "init", "-q", "-b", "main")
    git(target, "add", "-A")
    git(target, "commit", "-q", "-m", "sample app")
    return target


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free on `host` now (all held open together while they are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


# -- load through the load balancer ------------------------------------------------------------

class WriteLoad(threading.Thread):
    """POSTs entries with unique texts until stopped (or max_seconds); keeps each acknowledged
    text (201) and each failure, with the time it happened."""

    def __init__(self, url: str, max_seconds: float = 300, max_requests: int = 50000):
        super().__init__(daemon=True)
        self.url, self.max_seconds, self.max_requests = url, max_seconds, max_requests
        self.acknowledged: list[tuple[float, str]] = []
        self.failures: list[tuple[float, str]] = []
        self.stop_event = threading.Event()
        self.run_id = uuid.uuid4().hex[:8]

    def run(self) -> None:
        started = time.monotonic()
        with httpx.Client(verify=False, timeout=10) as http:
            for n in range(self.max_requests):
                if self.stop_event.is_set() or time.monotonic() - started > self.max_seconds:
                    return
                text = f"load-{self.run_id}-{n}"
                try:
                    response = http.post(self.url + "/api/entries", data={"text": text})
                    if response.status_code == 201:
                        self.acknowledged.append((time.monotonic(), text))
                    else:
                        self.failures.append((time.monotonic(), f"HTTP {response.status_code}"))
                except httpx.HTTPError as exc:
                    self.failures.append((time.monotonic(), type(exc).__name__))
                time.sleep(0.01)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=30)

    def acknowledged_since(self, moment: float) -> int:
        return sum(1 for at, _ in self.acknowledged if at > moment)

    def longest_gap(self) -> float:
        times = [at for at, _ in self.acknowledged]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


class RequestLoad:
    """Steady GET load through the load balancer from two threads: one keeps its connection
    alive (on `path`), one opens a new connection for every request (on `new_connection_path`,
    `path` by default). Records every outcome: (time, status or error name, the release served)."""

    def __init__(self, url: str, path: str = "/api/info", max_seconds: float = 300,
                 new_connection_path: str | None = None):
        self.url, self.max_seconds = url, max_seconds
        self.outcomes: list[tuple[float, str, str]] = []
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(True, path), daemon=True),
                        threading.Thread(target=self._run, args=(False, new_connection_path or path), daemon=True)]
        self._lock = threading.Lock()

    def _record(self, outcome: str, release: str = "") -> None:
        with self._lock:
            self.outcomes.append((time.monotonic(), outcome, release))

    def _one(self, http: httpx.Client, path: str) -> None:
        try:
            response = http.get(self.url + path)
            body = response.json() if response.status_code == 200 else {}
            self._record(str(response.status_code), body.get("release", "") if isinstance(body, dict) else "")
        except (httpx.HTTPError, ValueError) as exc:
            self._record(type(exc).__name__)

    def _run(self, keep_alive: bool, path: str) -> None:
        started = time.monotonic()
        client = httpx.Client(verify=False, timeout=15) if keep_alive else None
        try:
            while not self.stop_event.is_set() and time.monotonic() - started < self.max_seconds:
                if client is not None:
                    self._one(client, path)
                else:
                    with httpx.Client(verify=False, timeout=15) as http:
                        self._one(http, path)
                time.sleep(0.005)
        finally:
            if client is not None:
                client.close()

    def __enter__(self) -> RequestLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=30)

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = {}
        with self._lock:
            for _, outcome, _ in self.outcomes:
                found[outcome] = found.get(outcome, 0) + 1
        return found

    def between(self, start: float, end: float) -> tuple[int, int]:
        """(failed, all) requests that ended between `start` and `end` (monotonic times)."""
        with self._lock:
            window = [outcome for at, outcome, _ in self.outcomes if start <= at <= end]
        return sum(1 for outcome in window if outcome != "200"), len(window)
