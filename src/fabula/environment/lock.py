"""The environment's lock: one file, ``lock.json`` in the environment's directory, saying who is
changing the environment (user@host, pid, since when, which command).

Two commands changing one environment at once would undo each other's work (two builds of one
release into the same folder, a deploy during a failover), so every changing command holds it.

A lock whose process has died on this host (killed, machine rebooted) is *stale*: the next
command takes it over with a warning rather than asking for `fabula unlock`, because the README
promises that re-running `fabula create` after a crash finishes the job. A lock held by a live
process, or by a process on another host (whose liveness cannot be checked from here), is only
ever broken by `fabula unlock ENV`.
"""
from __future__ import annotations

import fcntl
import getpass
import json
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from fabula.state import EnvPaths

LOCK_FILE = "lock.json"
MODE = 0o600  # the lock says who runs what: readable by root only, like the history


def lock_path(paths: EnvPaths) -> Path:
    return paths.env_dir / LOCK_FILE


def now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def current_user() -> str:
    # fabula runs under sudo: the person who typed the command is more use in an audit than "root"
    return os.environ.get("SUDO_USER") or getpass.getuser()


def owner() -> str:
    return f"{current_user()}@{socket.gethostname()}"


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None if there is no live process.

    With the pid it identifies one process: a pid reused by an unrelated process after the
    holder died has another start time, so the lock is still recognised as stale.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):  # exited, not yet reaped: it can no longer change anything
        return None
    return fields[19]  # field 22 of stat(5); fields[0] is field 3


@dataclass(frozen=True)
class Holder:
    """What the lock file records about the command holding it."""

    id: str          # also the id of the history record the operation will write
    owner: str       # user@host
    host: str
    pid: int
    pid_start: str | None
    boot_id: str
    started: str     # ISO time
    action: str
    command: str

    @classmethod
    def of_this_process(cls, action: str, command: str) -> Holder:
        return cls(id=uuid.uuid4().hex[:12], owner=owner(), host=socket.gethostname(), pid=os.getpid(),
                   pid_start=process_start(os.getpid()), boot_id=boot_id(), started=now_iso(),
                   action=action, command=command)

    @classmethod
    def from_json(cls, raw: dict) -> Holder:
        return cls(**{name: raw.get(name) for name in cls.__dataclass_fields__})  # type: ignore[arg-type]

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def is_this_process(self) -> bool:
        return self.on_this_host() and self.pid == os.getpid() and self.pid_start == process_start(os.getpid())

    def is_stale(self) -> bool:
        """True only when it is certain that the holder is gone: same host and a dead pid."""
        if not self.on_this_host():
            return False
        if self.boot_id and self.boot_id != boot_id():
            return True
        start = process_start(self.pid)
        return start is None or (self.pid_start is not None and start != self.pid_start)

    def describe(self) -> str:
        return f"{self.owner} (pid {self.pid}, since {self.started}): `{self.command}`"


class Unreadable(Exception):
    """The lock file exists but does not say who holds it (e.g. written by hand, or truncated)."""


def read(paths: EnvPaths) -> Holder | None:
    path = lock_path(paths)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as fh:
            raw = json.load(fh)
        return Holder.from_json(raw)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise Unreadable(f"{path}: {exc}") from None


@contextmanager
def guarded(paths: EnvPaths) -> Iterator[None]:
    """Serialise the short read-decide-write sections of lock, unlock and release.

    Without it two commands finding the same stale lock could both take it over (the second
    removing the first one's fresh lock). flock on the directory needs no file of its own and
    is dropped by the kernel when the process dies, so it can never be stale itself.
    """
    fd = os.open(paths.env_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def create_exclusively(paths: EnvPaths, holder: Holder) -> bool:
    """Write the lock file only if there is none; False if one exists.

    The record is written to a temporary file and hard-linked into place: link(2) fails if the
    name exists (like O_CREAT|O_EXCL), and readers never see a half-written lock.
    """
    path = lock_path(paths)
    fd, tmp = tempfile.mkstemp(dir=paths.env_dir, prefix=f".{LOCK_FILE}.")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(holder), fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, MODE)  # mkstemp made it so already; said for the reader
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def remove_if(paths: EnvPaths, holder_id: str) -> bool:
    """Remove the lock if it is still `holder_id`'s (it may have been broken and retaken)."""
    try:
        current = read(paths)
    except Unreadable:
        return False
    if current is None or current.id != holder_id:
        return False
    lock_path(paths).unlink()
    return True


def break_lock(paths: EnvPaths) -> tuple[Holder | None, bool]:
    """Remove the lock whoever holds it: (the holder if readable, whether there was a lock)."""
    if not paths.env_dir.is_dir():
        return None, False
    try:
        with guarded(paths):
            return break_guarded(paths)
    except FileNotFoundError:  # the environment was destroyed meanwhile
        return None, False


def break_guarded(paths: EnvPaths) -> tuple[Holder | None, bool]:
    """break_lock's work, for a caller that holds guarded()."""
    try:
        holder = read(paths)
    except Unreadable:
        holder = None
    try:
        lock_path(paths).unlink()
    except FileNotFoundError:
        return holder, False
    return holder, True


def report(paths: EnvPaths) -> dict | None:
    """The lock as `fabula describe` shows it: None when the environment is not locked."""
    try:
        holder = read(paths)
    except Unreadable as exc:
        return {"unreadable": str(exc)}
    if holder is None:
        return None
    return {"owner": holder.owner, "pid": holder.pid, "started": holder.started, "action": holder.action,
            "command": holder.command, "stale": holder.is_stale()}
