"""The provider boundary: what roles and operations may ask of a server and of the platform."""
from __future__ import annotations

import abc
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from fabula.accounts import Accounts
from fabula.errors import CommandFailed, FabulaError

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
    """A security-group rule, in the architecture's terms: `port` on this server is open to the
    servers of `from_roles`, with `from_load_balancer` to the load balancer, and with
    `from_anywhere` to every address (the load balancer's own ports). The provider resolves them:
    to addresses (local, ssh), to security-group references (aws)."""

    port: int
    description: str
    from_roles: tuple[str, ...] = ()
    from_load_balancer: bool = False
    from_anywhere: bool = False


@dataclass(frozen=True)
class EgressRule:
    """A security-group rule: this server may open connections to `port` on the servers of `to_roles`."""

    port: int
    description: str
    to_roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class FileState:
    mode: int     # permission bits, e.g. 0o600
    owner: str    # user name


class Host(abc.ABC):
    """One server, reached however the provider reaches it (a namespace, SSH...).

    A provider implements the transport only: the abstract methods below (run a command, read,
    write and inspect a file, copy files between this machine and the server). What is built on
    them (idempotent files and directories, releases, the supervisor) is written once, here and
    in the modules that use it, for every provider."""

    name: str
    role: str
    address: str
    root: PurePosixPath   # the server's private directory: configs, data, logs, releases
    accounts: Accounts    # the environment's own system users, that its services run as
    # How Supervisor.ensure_running starts the server's supervisord when it is not running. None:
    # directly (`supervisord -c CONF`, which daemonizes). A provider whose servers have a service
    # manager sets its own on its hosts, which starts it there and returns True (ssh: through the
    # server's systemd unit, which brings it back if it dies and after a reboot), or returns False
    # where the host has none, for the direct start.
    start_supervisord: Callable[[], bool] | None = None

    # -- the transport ---------------------------------------------------------------------
    @abc.abstractmethod
    def run(self, argv: list[str], *, user: str | None = None, env: dict[str, str] | None = None,
            input: str | None = None, timeout: float | None = 120) -> Result:
        """Run a command on the server, as root or as `user`, with exactly `env` added to a fixed
        base environment (never in argv); never raises for a non-zero exit."""

    @abc.abstractmethod
    def interactive(self, argv: list[str], *, user: str | None = None, env: dict[str, str] | None = None) -> int:
        """Run a command with the caller's terminal attached; return its exit status."""

    @abc.abstractmethod
    def read(self, path: PurePosixPath) -> bytes | None:
        """The file's content, or None when it does not exist."""

    @abc.abstractmethod
    def write(self, path: PurePosixPath, data: bytes, *, mode: int, owner: str) -> None:
        """Replace the file atomically (a reader sees the old content or the new, whole), owned by
        `owner` and its primary group."""

    @abc.abstractmethod
    def stat(self, path: PurePosixPath) -> FileState | None:
        """The file's mode and owner, or None when it does not exist."""

    @abc.abstractmethod
    def copy_tree(self, local: Path, path: PurePosixPath) -> None:
        """Put a directory tree of this machine (a built release, which never changes once built) at
        `path`, which must not exist: a copy, or on this very machine a link to it."""

    @abc.abstractmethod
    def fetch(self, path: PurePosixPath, local: Path) -> None:
        """Copy a (possibly large) file from the server to this machine."""

    @abc.abstractmethod
    def push(self, local: Path, path: PurePosixPath, *, mode: int = 0o600, owner: str = "root") -> None:
        """Copy a (possibly large) file from this machine to the server."""

    # -- built on the transport, for every provider ------------------------------------------
    def check(self, argv: list[str], **kwargs) -> Result:
        result = self.run(argv, **kwargs)
        if not result.ok:
            raise CommandFailed(self.name, argv, result.returncode, result.stdout + result.stderr)
        return result

    def path(self, *parts: str) -> PurePosixPath:
        return self.root.joinpath(*parts)

    def put_file(self, path: PurePosixPath, content: str | bytes, *, mode: int = 0o644,
                 owner: str = "root") -> bool:
        """Write a file if its content, mode or owner differ; return True if anything changed."""
        data = content.encode() if isinstance(content, str) else content
        if self.stat(path) == FileState(mode, owner) and self.read(path) == data:
            return False
        self.write(path, data, mode=mode, owner=owner)
        return True

    def read_file(self, path: PurePosixPath) -> bytes | None:
        return self.read(path)

    def make_dirs(self, paths: list[PurePosixPath], *, mode: int = 0o755, owner: str = "root") -> None:
        """Make the directories (and their parents), each owned by `owner` with `mode`."""
        if all(self.stat(p) == FileState(mode, owner) for p in paths):
            return
        self.check(["sh", "-ec", 'owner=$1 mode=$2; shift 2; mkdir -p -- "$@"; chown -- "$owner:" "$@"; '
                    'chmod -- "$mode" "$@"', "sh", owner, f"{mode:o}", *map(str, paths)])

    def fetch_file(self, path: PurePosixPath, local: Path) -> None:
        self.fetch(path, local)

    def push_file(self, local: Path, path: PurePosixPath, *, mode: int = 0o600, owner: str = "root") -> None:
        self.push(local, path, mode=mode, owner=owner)


@dataclass(frozen=True)
class BuildPlace:
    """Where a release is built: on this machine (`host` None), or on one of the environment's
    hosts, whose distribution, architecture and Python the app's servers share."""
    why: str
    host: Host | None = None


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

    def start_ahead(self) -> None:
        """Bring a load balancer that is not running yet up with no backends (it answers 503),
        while the web servers are still being made, so that its own start is not on `create`'s
        path; one that runs is left as it is. Default: nothing (ensure() does it all)."""
        return None

    @abc.abstractmethod
    def health(self) -> dict[str, str]:
        """Each backend's health as the load balancer sees it ("UP", "DOWN", ...)."""

    @abc.abstractmethod
    def drain(self, name: str) -> None:
        """Send no new requests to this backend; those in flight finish."""

    def ready(self, name: str) -> None:
        """Send requests to a drained backend again (an in-place deploy puts a host back)."""
        raise NotImplementedError(f"{type(self).__name__} cannot put a drained backend back")

    @abc.abstractmethod
    def active_requests(self, name: str) -> int:
        """Requests the backend is serving now (0 once a drained backend is idle)."""

    def wait_drained(self, name: str, timeout: float) -> bool:
        """Wait until a drained backend serves no request any more; False if it still does after
        `timeout` seconds (the caller removes it anyway: a request that long is cut)."""
        return poll(lambda: self.active_requests(name) == 0, timeout, interval=0.1)

    @abc.abstractmethod
    def stats(self) -> dict[str, dict[str, str]]:
        """Per backend, the load balancer's counters: at least `scur` (requests in progress),
        `req_rate` (requests per second) and `status`."""

    @abc.abstractmethod
    def is_running(self) -> bool:
        """Whether the load balancer exists and answers."""

    @abc.abstractmethod
    def url(self) -> str:
        ...


class WebGroup(abc.ABC):
    """The web tier as a group: web servers launched from one launch configuration (a release),
    kept at a desired count. fabula's own autoscaler on the provider's servers and load balancer
    (autoscaling/group.py), or the platform's native group (on AWS, an Auto Scaling group)."""

    @abc.abstractmethod
    def desired(self) -> int:
        """How many web servers the group keeps."""

    @abc.abstractmethod
    def set_desired(self, count: int) -> dict:
        """Set the desired count and launch or retire web servers now; what changed:
        {"from": n, "to": count} and, if any, "launched" and "retired" (lists of names)."""

    @abc.abstractmethod
    def members(self) -> list[str]:
        """The names of the group's web servers."""

    @abc.abstractmethod
    def health(self) -> dict[str, str]:
        """Each member's health as the load balancer sees it ("UP", "DOWN", "DRAIN"...); a member
        the load balancer does not forward to is left out."""

    @abc.abstractmethod
    def release(self) -> str | None:
        """The launch configuration's release id; None before the environment is created."""


@dataclass(frozen=True)
class Member:
    """A web server of a platform's own group, as the platform launched it."""

    name: str             # the platform's name for it (an instance id): fabula's name for the server too
    address: str          # its private address
    release: str | None   # the release of the launch configuration it was launched from


class NativeWebGroup(WebGroup):
    """A platform's own group (on AWS, an Auto Scaling group): the platform launches and
    terminates its web servers; fabula converges each over SSH with the same role code as on
    every provider (deploy/native.py), through the provider's ensure_server and load balancer.
    A member is named by the platform (its name is fabula's record of it)."""

    @abc.abstractmethod
    def launch_from(self, release: str) -> bool:
        """The release's launch configuration (made once per release), and the group launching
        its next web servers from it (the group made, at its desired count, if missing); True if
        the group changed."""

    @abc.abstractmethod
    def wait_members(self, count: int, timeout: float) -> list[Member]:
        """The group's members once exactly `count` of them are running and in service in the
        group (not the load balancer: fabula's business); an error naming what is missing after
        `timeout` seconds."""

    @abc.abstractmethod
    def in_service(self) -> list[Member]:
        """The members running and in service in the group now (those still launching are not)."""

    @abc.abstractmethod
    def terminate(self, name: str) -> None:
        """Terminate a member (drained before, by the caller), the desired count decremented:
        the group launches no replacement."""

    @abc.abstractmethod
    def suspend(self, processes: list[str], suspend: bool) -> None:
        """Suspend (or resume) the group's own processes for fabula's `processes` ("scaling":
        changing its size from demand, "healing": replacing failing servers; both: everything
        the group does on its own, launching and terminating included)."""

    @abc.abstractmethod
    def report(self) -> dict:
        """The group as the platform has it, for `describe`: "name", "exists", "min", "desired",
        "max", "release" (its launch configuration's), "suspended" (the platform's process names),
        "scaling" (its policy, in words, or None) and "instances": each member's "name",
        "lifecycle", "health" (the group's view), "target" (the load balancer's), "release"."""


class SharedStore(abc.ABC):
    """Where a team's operators share an environment whose servers are not on one machine (a
    fixed inventory reached from several laptops): its lock, and the files that say what it is
    (state, history, secrets, certificate authority), kept on the platform's side."""

    @abc.abstractmethod
    def acquire(self, holder: dict) -> dict | None:
        """Take the shared lock for `holder` (kept until release(), and released by the platform
        if this process dies or is cut off): None, or the record of whoever holds it."""

    @abc.abstractmethod
    def release(self) -> None:
        ...

    @abc.abstractmethod
    def holder(self) -> dict | None:
        """The record of whoever holds the shared lock now, or None."""

    def interrupted(self) -> dict | None:
        """After acquire(): the record of a holder that was cut off before it released the lock
        (and so before it sent its files back), or None."""
        return None

    @abc.abstractmethod
    def pull(self, files: dict[str, Path]) -> None:
        """Copy each shared file or folder (name -> this machine's path) that exists over this
        machine's copy; what is not shared yet stays as it is here."""

    @abc.abstractmethod
    def push(self, files: dict[str, Path]) -> None:
        """Replace the shared copies by this machine's files and folders (those that exist)."""


def pack_shared(files: dict[str, Path], archive: IO[bytes]) -> None:
    """The shared files and folders of this machine that exist, as a tar stream (name -> path)."""
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, local in files.items():
            if local.exists():
                tar.add(local, arcname=name)


def extract_plain(tar: tarfile.TarFile, folder: Path) -> None:
    """Extract files and folders only, each inside `folder` (tarfile's "data" filter, which the
    Python of Debian 12, 3.11.2, where fabula's program runs on AWS, does not have yet)."""
    for member in tar.getmembers():
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
            raise FabulaError(f"the shared files hold {member.name!r}, which is not a plain file or folder inside "
                              "their archive", "replace the shared files with a command of this fabula")
        member.mode &= 0o755 if member.isdir() else 0o644
    tar.extractall(folder)  # noqa: S202 - every member checked above


def unpack_shared(archive: IO[bytes], files: dict[str, Path]) -> None:
    """Put the shared copies of a tar stream made by pack_shared over this machine's files and
    folders (root's only); a name the stream does not hold leaves this machine's copy as it is."""
    with tempfile.TemporaryDirectory(prefix="fabula-shared-") as tmp:
        unpacked = Path(tmp)
        with tarfile.open(fileobj=archive) as tar:
            extract_plain(tar, unpacked)
        for name, local in files.items():
            source = unpacked / name
            if source.is_dir():
                shutil.rmtree(local, ignore_errors=True)
                shutil.copytree(source, local)
                local.chmod(0o700)
            elif source.is_file():
                local.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, local)
                local.chmod(0o600)


@dataclass(frozen=True)
class ProgramHome:
    """fabula's own program on the platform host: `python` has fabula installed, `config` is the
    environment's fabula.yml there, `state_root` the program's FABULA_STATE_DIR; `environment`
    what else its environment holds."""

    python: str
    config: str
    state_root: str
    environment: dict[str, str] = field(default_factory=dict)


class Provider(abc.ABC):
    name: str

    def shared_store(self) -> SharedStore | None:
        """Where operators on several machines share the environment; None when its state lives
        on this machine only (local: the servers are this machine's too)."""
        return None

    def web_group(self, ctx: Any) -> NativeWebGroup | None:
        """The platform's own web group for the operation's context (fabula.context.Context: Any
        here, since that module imports this one), or None: fabula then manages the group itself
        (its own autoscaler, on this provider's servers and load balancer). A provider with a
        native group (aws: an Auto Scaling group) returns its own."""
        return None

    def trust_host_keys(self) -> list[str]:
        """Record the servers' host keys where the provider checks them (ssh: known_hosts) and
        say, one line per server, what was recorded or already known."""
        raise FabulaError(f"provider {self.name} reaches its servers without host keys: there is nothing to trust",
                          "`fabula trust` is for environments with `provider: ssh`")

    def build_place(self) -> BuildPlace:
        """Where releases are built, and why there (said in the build's output): this machine
        when the servers run its system, else one of the environment's hosts, prepared for it;
        an error naming the difference when neither would do."""
        return BuildPlace("this machine, whose system the servers share")

    @abc.abstractmethod
    def check_prerequisites(self) -> None:
        """Raise a PrerequisiteError naming what is missing and how to get it."""

    def check_can_create(self, config_path: str) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Refuse, with a ConfigError naming the key in `config_path`, what only the platform can
        tell is wrong before anything is made (e.g. the load balancer's ports already taken)."""

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
    def ensure_server(self, name: str, role: str) -> Host:
        """Create the server of the inventory's record `name` if missing (idempotent) and return it;
        its address is the provider's to give (and record in the inventory)."""

    @abc.abstractmethod
    def host(self, name: str) -> Host:
        """The existing server of the inventory's record `name`, without creating anything."""

    @abc.abstractmethod
    def server_exists(self, name: str) -> bool:
        ...

    @abc.abstractmethod
    def list_servers(self) -> list[str]:
        """The names of the environment's servers that exist on the platform (in the inventory
        or not: e.g. one left by a crash)."""

    @abc.abstractmethod
    def prepare_host(self, host: Host, packages: tuple[str, ...]) -> None:
        """Make the server ready for its role: the role's Debian packages installed, and the
        distribution's own services of those packages kept from holding fabula's ports."""

    @abc.abstractmethod
    def platform_host(self) -> Host:
        """Where the load balancer's own files and fabula's long-running programs (the autoscaler)
        live: the machine's own namespace locally; an instance of fabula's elsewhere."""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Let go of what the provider holds open (connections): a long-running program opens the
        environment again every round."""

    def program_home(self, config: Path, state_root: Path, python: str) -> ProgramHome:
        """Where fabula's own program runs on platform_host(): by default the platform host
        shares this machine's files (the local provider's namespaces), so this machine's
        interpreter, `config` and `state_root`. A provider whose platform host does not ships
        fabula there (program_home.ship), on `python` (the app's, which the host has)."""
        return ProgramHome(sys.executable, str(config), str(state_root))

    @abc.abstractmethod
    def apply_firewall(self, host: Host, rules: list[IngressRule | EgressRule]) -> bool:
        """Admit only these rules' traffic to and from the server (connections it accepts, and
        those it opens); return True if anything changed."""

    @abc.abstractmethod
    def remove_server(self, name: str, drained: bool = False) -> None:
        """Remove the server and what runs on it. `drained`: the load balancer has drained it
        (or it never served), so nothing on it needs an orderly stop to finish its work."""

    @abc.abstractmethod
    def destroy(self) -> list[str]:
        """Remove everything the environment made, also after a crash; return what was removed."""

    def activity(self) -> str | None:
        """What this command asked of the platform's API, for the end of `create` (None: no API)."""
        return None

    load_balancer: LoadBalancer


def poll(condition: Callable[[], object], timeout: float, interval: float = 0.2) -> bool:
    """Call `condition` until it holds (True) or `timeout` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


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
