"""The provider boundary: what roles and operations may ask of a server and of the platform."""
from __future__ import annotations

import abc
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fabula.accounts import Accounts
from fabula.errors import CommandFailed

# the PATH of every command fabula runs on a server or starts as a program: never the operator's
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass(frozen=True)
class IngressRule:
    """A security-group rule: `port` on this server is open to `sources` (addresses)."""

    port: int
    sources: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class EgressRule:
    """A security-group rule: this server may open connections to `port` on `destinations`."""

    port: int
    destinations: tuple[str, ...]
    description: str


class Host(abc.ABC):
    """One server, reached however the provider reaches it (a namespace, SSH...)."""

    name: str
    role: str
    address: str
    root: PurePosixPath   # the server's private directory: configs, data, logs, releases
    accounts: Accounts    # the environment's own system users, that its services run as

    @abc.abstractmethod
    def run(self, argv: list[str], *, user: str | None = None, env: dict[str, str] | None = None,
            input: str | None = None, timeout: float | None = 120) -> Result:
        """Run a command on the server, as root or as `user`; never raises for a non-zero exit."""

    def check(self, argv: list[str], **kwargs) -> Result:
        result = self.run(argv, **kwargs)
        if not result.ok:
            raise CommandFailed(self.name, argv, result.returncode, result.stdout + result.stderr)
        return result

    @abc.abstractmethod
    def interactive(self, argv: list[str], *, user: str | None = None, env: dict[str, str] | None = None) -> int:
        """Run a command with the caller's terminal attached; return its exit status."""

    @abc.abstractmethod
    def put_file(self, path: PurePosixPath, content: str | bytes, *, mode: int = 0o644,
                 owner: str = "root") -> bool:
        """Write a file atomically; return True if its content, mode or owner changed."""

    @abc.abstractmethod
    def read_file(self, path: PurePosixPath) -> bytes | None:
        """The file's content, or None when it does not exist."""

    @abc.abstractmethod
    def make_dirs(self, paths: list[PurePosixPath], *, mode: int = 0o755, owner: str = "root") -> None:
        ...

    @abc.abstractmethod
    def fetch_file(self, path: PurePosixPath, local: "Path") -> None:
        """Copy a (possibly large) file from the server to this machine."""

    @abc.abstractmethod
    def push_file(self, local: "Path", path: PurePosixPath, *, mode: int = 0o600, owner: str = "root") -> None:
        """Copy a (possibly large) file from this machine to the server."""

    @abc.abstractmethod
    def install_release(self, release_dir: str, release_id: str) -> PurePosixPath:
        """Put a built release on the server (once) and return where it is."""

    @abc.abstractmethod
    def start_supervisor(self, config: PurePosixPath) -> None:
        """Make sure the server's process supervisor runs with this configuration."""

    def path(self, *parts: str) -> PurePosixPath:
        return self.root.joinpath(*parts)


@dataclass(frozen=True)
class Backend:
    name: str
    address: str
    port: int


class LoadBalancer(abc.ABC):
    """The platform's load balancer in front of the web servers (HAProxy locally, an ALB on AWS)."""

    @abc.abstractmethod
    def ensure(self, backends: list[Backend]) -> None:
        """Create or update it so that it forwards to exactly these backends."""

    @abc.abstractmethod
    def health(self) -> dict[str, str]:
        """Each backend's health as the load balancer sees it ("UP", "DOWN", ...)."""

    @abc.abstractmethod
    def drain(self, name: str) -> None:
        """Send no new requests to this backend; those in flight finish."""

    @abc.abstractmethod
    def active_requests(self, name: str) -> int:
        """Requests the backend is serving now (0 once a drained backend is idle)."""

    @abc.abstractmethod
    def url(self) -> str:
        ...

    @abc.abstractmethod
    def source_addresses(self) -> tuple[str, ...]:
        """Where the load balancer's requests come from, for the web servers' firewall."""


class Provider(abc.ABC):
    name: str

    @abc.abstractmethod
    def check_prerequisites(self) -> None:
        """Raise a PrerequisiteError naming what is missing and how to get it."""

    @abc.abstractmethod
    def allocate_subnet(self) -> str:
        ...

    @abc.abstractmethod
    def ensure_network(self) -> None:
        ...

    @abc.abstractmethod
    def ensure_accounts(self) -> Accounts:
        """The environment's own system users, that its services run as (created if missing)."""

    @abc.abstractmethod
    def ensure_server(self, name: str, role: str, address: str) -> Host:
        """Create the server if missing (idempotent) and return it."""

    @abc.abstractmethod
    def host(self, name: str, role: str, address: str) -> Host:
        """The existing server, without creating anything."""

    @abc.abstractmethod
    def server_exists(self, name: str) -> bool:
        ...

    @abc.abstractmethod
    def apply_firewall(self, host: Host, rules: list[IngressRule | EgressRule]) -> bool:
        """Admit only these rules' traffic to and from the server (connections it accepts, and
        those it opens); return True if anything changed."""

    @abc.abstractmethod
    def remove_server(self, name: str) -> None:
        ...

    @abc.abstractmethod
    def destroy(self) -> list[str]:
        """Remove everything the environment made, also after a crash; return what was removed."""

    load_balancer: LoadBalancer


def run_local(argv: list[str], *, input: str | None = None, env: dict[str, str] | None = None,
              timeout: float | None = 120, cwd: str | None = None) -> Result:
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=cwd)
    except FileNotFoundError:
        return Result(127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired as exc:
        return Result(124, exc.stdout or "" if isinstance(exc.stdout, str) else "",
                      f"timed out after {timeout}s")
    return Result(proc.returncode, proc.stdout, proc.stderr)
