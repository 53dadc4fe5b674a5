"""The inventory of what an environment has: where it lives and what exists, written atomically.

Everything an environment makes on the machine lives under one directory,
``<state root>/<project>-<env>/``; the state file there records the servers, their
addresses and the release, so that ``describe`` and ``destroy`` never guess.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_STATE_ROOT = Path("/var/lib/fabula")


def state_root() -> Path:
    return Path(os.environ.get("FABULA_STATE_DIR", DEFAULT_STATE_ROOT))


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write so that a crash leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
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

    @property
    def env_dir(self) -> Path:
        return self.root / f"{self.project}-{self.env}"

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
    address: str
    release: str | None = None
    # a database server that must be rebuilt from the primary before it serves (e.g. a fenced
    # former primary): it admits no connections and is not used as a replica until then
    rebuild: bool = False


@dataclass
class EnvState:
    project: str
    env: str
    provider: str = "local"
    subnet: str | None = None
    servers: dict[str, ServerRecord] = field(default_factory=dict)
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
    def load(cls, paths: EnvPaths) -> "EnvState | None":
        if not paths.state_file.exists():
            return None
        raw = json.loads(paths.state_file.read_text())
        raw["servers"] = {name: ServerRecord(**rec) for name, rec in raw.get("servers", {}).items()}
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
        return [s for s in self.servers.values() if s.role == role]

    def one(self, role: str) -> ServerRecord | None:
        found = self.by_role(role)
        return found[0] if found else None

    def serving_replicas(self) -> list[ServerRecord]:
        return [s for s in self.by_role("db-replica") if not s.rebuild]
