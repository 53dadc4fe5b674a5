"""The inventory of what an environment has: where it lives and what exists, written atomically.

Everything an environment makes on the machine lives under one directory,
``<state root>/<project>/<env>/``; the state file there records the servers, their
addresses and the release, so that ``describe`` and ``destroy`` never guess. One directory per
(project, environment) pair and never shared: project and environment names are slugs (no ``/``,
no ``.``), so two environments cannot map to one directory (as ``shop`` + ``eu-prod`` and
``shop-eu`` + ``prod`` did with the former ``<project>-<env>`` layout), and a directory whose
state file names another environment is refused rather than used. The history is kept beside
the directory (``<env>.history.jsonl``), so that it outlives ``destroy``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fabula.errors import ConfigError, FabulaError

DEFAULT_STATE_ROOT = Path("/var/lib/fabula")
# what else lives directly under the state root: a project of one of these names would share it
RESERVED_PROJECTS = ("cache", "backups")


def state_root() -> Path:
    return Path(os.environ.get("FABULA_STATE_DIR", DEFAULT_STATE_ROOT))


def write_atomically(path: Path, data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Write so that a crash leaves either the old file or the new one, never half of one.
    `durable=False` skips the fsync, for files that a machine's crash makes moot anyway."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class EnvPaths:
    """Where one environment's files live on the machine running fabula."""

    root: Path          # the state root, shared by all environments (wheel cache, locks)
    project: str
    env: str

    def __post_init__(self) -> None:
        if self.project in RESERVED_PROJECTS:
            raise ConfigError(f"project name {self.project!r} is reserved: fabula keeps its "
                              f"{self.project} under {self.root / self.project}",
                              f"choose another `project:` in fabula.yml (not one of {', '.join(RESERVED_PROJECTS)})")
        for what, name in (("project", self.project), ("environment", self.env)):
            if not name or "/" in name or name.startswith(".") or name in ("..", "."):
                raise ConfigError(f"{what} name {name!r} cannot name a state directory",
                                  "use lower-case letters, digits and dashes")

    @property
    def project_dir(self) -> Path:
        """The project's directory: its environments' directories and their histories."""
        return self.root / self.project

    @property
    def env_dir(self) -> Path:
        return self.project_dir / self.env

    @property
    def legacy_env_dir(self) -> Path:
        """Where fabula kept the environment before the ``<project>/<env>`` layout."""
        return self.root / f"{self.project}-{self.env}"

    @property
    def history_file(self) -> Path:
        """Beside the environment's directory, not in it: `destroy` records itself there."""
        return self.project_dir / f"{self.env}.history.jsonl"

    @property
    def backups_dir(self) -> Path:
        """The default folder of the environment's database backups."""
        return self.root / "backups" / self.project / self.env

    def make_env_dir(self) -> None:
        """Make the environment's directory (and the project's), traversable by the services'
        users (postgres, www-data...), whose files are in it."""
        for folder in (self.root, self.project_dir, self.env_dir):
            if not folder.is_dir():
                folder.mkdir(mode=0o755, exist_ok=True)
                folder.chmod(0o755)  # whatever the umask

    @property
    def state_file(self) -> Path:
        return self.env_dir / "state.json"

    @property
    def secrets_dir(self) -> Path:
        return self.env_dir / "secrets"

    @property
    def pki_dir(self) -> Path:
        return self.env_dir / "pki"

    @property
    def releases_dir(self) -> Path:
        return self.env_dir / "releases"

    @property
    def lb_dir(self) -> Path:
        return self.env_dir / "lb"

    @property
    def servers_dir(self) -> Path:
        return self.env_dir / "servers"

    @property
    def trash_dir(self) -> Path:
        """Where a destroyed environment's files wait for their removal in the background."""
        return self.root / ".trash"

    @property
    def wheel_cache(self) -> Path:
        return self.root / "cache" / "uv"

    @property
    def tag(self) -> str:
        """A short stable id for kernel object names limited to 15 characters."""
        return hashlib.sha256(f"{self.project}/{self.env}".encode()).hexdigest()[:8]


@dataclass
class ServerRecord:
    name: str
    role: str
    address: str = ""   # given by the provider when it makes the server
    release: str | None = None
    # a database server that must be rebuilt from the primary before it serves (e.g. a fenced
    # former primary): it admits no connections and is not used as a replica until then
    rebuild: bool = False
    # a web server of the group's warm pool: started from the group's release, out of the load
    # balancer and not a member, until a scale-out or a replacement puts it in service
    warm: bool = False


@dataclass
class EnvState:
    project: str
    env: str
    provider: str = "local"
    subnet: str | None = None
    servers: dict[str, ServerRecord] = field(default_factory=dict)
    # servers taken out of the plan (a host removed from `hosts:`) until `create` has removed
    # them: their records are how they are reached, and found again after a crash
    leaving: dict[str, ServerRecord] = field(default_factory=dict)
    release: str | None = None
    migrated_release: str | None = None
    previous_release: str | None = None   # what `fabula rollback` returns to
    # the highest server number and address ever used per role: replacements get new ones, since
    # a reused address would be reached at its old MAC address until neighbours' ARP entries expire
    last_number: dict[str, int] = field(default_factory=dict)
    last_address: str | None = None
    # replicas the primary waits for on commit (db.synchronous), once they stream
    sync_standbys: list[str] = field(default_factory=list)
    # the web group (deploy/autoscaling.py): its desired count (set by create, `fabula scale` and the
    # autoscaler), autoscaling.desired of fabula.yml when create last applied it (a changed value
    # there wins at the next create), and the autoscaler's suspended processes
    web_desired: int | None = None
    web_desired_config: int | None = None
    autoscaling_suspended: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, paths: EnvPaths) -> EnvState | None:
        """The environment's state, None if it has none; ConfigError if the file in its directory
        is another environment's (fabula never uses, nor destroys, another environment's files)."""
        if not paths.state_file.exists():
            check_no_legacy_dir(paths)
            return None
        raw = json.loads(paths.state_file.read_text())
        check_owner(paths, raw)
        for key in ("servers", "leaving"):
            raw[key] = {name: ServerRecord(**rec) for name, rec in raw.get(key, {}).items()}
        return cls(**raw)

    def reload(self, paths: EnvPaths) -> None:
        """Read the state file again into this object (which the provider shares), e.g. once an
        operation holds the lock: another process may have changed the environment meanwhile."""
        fresh = EnvState.load(paths)
        if fresh is not None:
            self.__dict__.update(fresh.__dict__)

    def save(self, paths: EnvPaths) -> None:
        write_atomically(paths.state_file, json.dumps(asdict(self), indent=2).encode())

    def by_role(self, role: str) -> list[ServerRecord]:
        """The servers of `role`; of the web servers, the group's members (not its warm pool)."""
        return [s for s in self.servers.values() if s.role == role and not s.warm]

    def warm_pool(self) -> list[ServerRecord]:
        return [s for s in self.servers.values() if s.warm]

    def one(self, role: str) -> ServerRecord | None:
        found = self.by_role(role)
        return found[0] if found else None

    def require(self, role: str) -> ServerRecord:
        """The first server of `role`; an error naming the role if the environment has none."""
        found = self.one(role)
        if found is None:
            raise FabulaError(f"this environment has no {role} server", "run `fabula create` for it")
        return found

    def serving_replicas(self) -> list[ServerRecord]:
        return [s for s in self.by_role("db-replica") if not s.rebuild]


def check_owner(paths: EnvPaths, raw: dict) -> None:
    """Refuse a state file that names another project or environment than the directory's."""
    named = (raw.get("project"), raw.get("env"))
    if named != (paths.project, paths.env):
        raise ConfigError(
            f"{paths.state_file} is the state of environment {named[1]!r} of project {named[0]!r}, "
            f"not of {paths.env!r} of {paths.project!r}: fabula will not use (nor destroy) another "
            f"environment's directory",
            f"point FABULA_STATE_DIR at the state root that holds {paths.project}/{paths.env}, or move "
            f"{paths.env_dir} back where environment {named[1]!r} of project {named[0]!r} expects it "
            f"({paths.root}/{named[0]}/{named[1]})")


def check_no_legacy_dir(paths: EnvPaths) -> None:
    """An environment created by a fabula from before the ``<project>/<env>`` layout is not
    silently ignored (its servers would run on, unknown to `describe` and `destroy`)."""
    legacy = paths.legacy_env_dir / "state.json"
    try:
        raw = json.loads(legacy.read_text())
    except (OSError, ValueError):
        return
    if isinstance(raw, dict) and (raw.get("project"), raw.get("env")) == (paths.project, paths.env):
        raise ConfigError(
            f"environment {paths.env} of {paths.project} is in {paths.legacy_env_dir}, where an older "
            f"fabula kept it; its directory is now {paths.env_dir}",
            f"destroy it with the fabula that created it, or, while none of its processes runs "
            f"(`ip netns list` shows none named fab.{paths.project}.{paths.env}.*), "
            f"`mkdir -p {paths.project_dir} && mv {paths.legacy_env_dir} {paths.env_dir}`, then "
            f"`fabula create {paths.env}`")


def state_files(root: Path) -> list[Path]:
    """The state file of every environment under `root` (e.g. to know the subnets in use)."""
    return sorted(root.glob("*/*/state.json"))
