"""The end-to-end environment: the sample app's 6 servers and load balancer, created once for the
module with the real CLI and destroyed afterwards, also when a test fails."""
from __future__ import annotations

import csv
import io
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from fabula.sample import SampleEnvironment
from tests.helpers import Run, free_port, make_app_repo

ENV = "ci"


class Environment(SampleEnvironment):
    """The sample environment with what only the local provider shows: its state directory,
    ports on this machine, supervisors, users and HAProxy's runtime API."""

    def __init__(self, project: str, app_dir: Path, state_dir: Path, https_port: int, http_port: int,
                 name: str = ENV):
        super().__init__(app_dir, state_dir, name)
        self._project, self.https_port, self.http_port = project, https_port, http_port

    @property
    def project(self) -> str:
        return self._project

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def env_dir(self) -> Path:
        return self.state_dir / self.project / self.name

    def supervisorctl(self, server: str, *args: str) -> Run:
        conf = self.env_dir / "servers" / server / "supervisor" / "supervisord.conf"
        return self.exec(server, "supervisorctl", "-c", str(conf), *args)

    @property
    def accounts(self):
        """The environment's own system users (its database's is PostgreSQL's superuser)."""
        from fabula.accounts import Accounts
        from fabula.state import EnvPaths
        return Accounts(EnvPaths(self.state_dir, self.project, self.name).tag)

    def psql(self, server: str, sql: str) -> str:
        """A query on `server` through its socket, in any state (also a fenced or stopped one's)."""
        socket_dir = self.env_dir / "servers" / server / "run" / "postgresql"
        db = self.project.replace("-", "_")
        result = self.exec(server, "runuser", "-u", self.accounts.db, "--", "psql", "-X", "-A", "-t",
                           "-U", "postgres", "-h", str(socket_dir), "-d", db, "-c", sql)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def haproxy_stats(self) -> list[dict[str, str]]:
        """HAProxy's `show stat` rows for the web backend's servers, from its runtime API."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.env_dir / "lb" / "haproxy.sock"))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return [r for r in rows if r["pxname"] == "web" and r["svname"] not in ("FRONTEND", "BACKEND")]

    def web_health(self) -> dict[str, str]:
        """HAProxy's view of each web server (UP, DOWN...), without the CLI (describe takes seconds)."""
        return {r["svname"]: r["status"] for r in self.haproxy_stats()}


def leftovers(env: Environment) -> list[str]:
    """What of the environment is still on the machine: namespaces, processes, its directory."""
    found = []
    prefix = f"fab.{env.project}.{env.name}."
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    found += [f"namespace {n}" for n in names if n.startswith(prefix)]
    needle = str(env.env_dir).encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "cmdline").read_bytes():
                    found.append(f"process {proc.name}")
            except OSError:
                pass
    if env.env_dir.exists():
        found.append(f"directory {env.env_dir}")
    found += [f"user {name}" for name in env.accounts.users().values() if user_exists(name)]
    return found


def user_exists(name: str) -> bool:
    return subprocess.run(["id", "-u", name], capture_output=True).returncode == 0


def force_cleanup(env: Environment) -> None:
    """The safety net behind `fabula destroy` in the tests: whatever of the environment is still
    on the machine (namespaces and what runs in them, processes, the bridge) goes."""
    from fabula.state import EnvPaths
    prefix = f"fab.{env.project}.{env.name}."
    for name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
        if name.startswith(prefix):
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            if pids:
                subprocess.run(["kill", "-9", *pids])
            subprocess.run(["ip", "netns", "del", name])
    needle = str(env.env_dir).encode()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), 9)
        except OSError:
            pass
    bridge = "fb" + EnvPaths(env.state_dir, env.project, env.name).tag
    subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    for name in env.accounts.users().values():
        subprocess.run(["pkill", "-9", "-u", name], capture_output=True)
        subprocess.run(["userdel", name], capture_output=True)
    subprocess.run(["groupdel", env.accounts.group], capture_output=True)


def destroy_checked(env: Environment) -> None:
    """Destroy with the real CLI; clean up by force whatever it left, then fail (unless the test
    already failed) so that a destroy that leaves residue never goes unnoticed."""
    destroyed = env.fabula("destroy", env.name, "--yes", timeout=300)
    left = leftovers(env)
    force_cleanup(env)
    if sys.exc_info()[0] is None:
        assert destroyed.returncode == 0 and not left, f"destroy left {left}: {destroyed.stderr[-2000:]}"


@contextmanager
def prepared_environment(prefix: str, servers: str | None = None, extra: str = ""):
    """A new environment of the sample app, not yet created: its app repository, state folder
    and ports. Whatever the test makes of it is destroyed afterwards, also when the test fails."""
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests need root (network namespaces)")
    # under /var/tmp, not pytest's 0700 tmp dirs: service users (postgres, www-data) must traverse it
    base = Path(tempfile.mkdtemp(prefix="fabula-e2e-", dir="/var/tmp"))
    base.chmod(0o755)
    env = Environment(project=f"{prefix}-{secrets.token_hex(3)}", app_dir=base / "app", state_dir=base / "state",
                      https_port=free_port(), http_port=free_port())
    kwargs = {"servers": servers} if servers else {}
    make_app_repo(env.app_dir, env.project, ENV, env.https_port, env.http_port, extra=extra, **kwargs)
    try:
        yield env
    finally:
        try:
            destroy_checked(env)
        finally:
            shutil.rmtree(base, ignore_errors=True)


@contextmanager
def running_environment(prefix: str, servers: str | None = None, extra: str = ""):
    """prepared_environment(), created with the real CLI."""
    with prepared_environment(prefix, servers, extra) as env:
        created = env.fabula("create", ENV, timeout=900)
        assert created.returncode == 0, f"create failed:\n{created.stdout}\n{created.stderr}"
        yield env


@pytest.fixture(scope="module")
def environment():
    with running_environment("e2e") as env:
        yield env
