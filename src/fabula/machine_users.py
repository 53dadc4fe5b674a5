"""An environment's system users and group on this machine (the one fabula runs on): its
servers' users with the local provider, and with every provider the user its releases are built as;
made by `create`, removed by `destroy`, with useradd/userdel under one lock (two environments
created at once would otherwise race for /etc/passwd's own lock, and useradd gives up instead of
waiting)."""
from __future__ import annotations

import fcntl
import grp
import os
import pwd
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from fabula.accounts import Accounts
from fabula.errors import FabulaError
from fabula.providers.base import run_local

NOLOGIN = "/usr/sbin/nologin"


@contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def gid(group: str) -> int:
    return grp.getgrnam(group).gr_gid


def _group_exists(group: str) -> bool:
    try:
        grp.getgrnam(group)
        return True
    except KeyError:
        return False


def _check(argv: list[str]) -> None:
    result = run_local(argv)
    if not result.ok:
        raise FabulaError(f"`{' '.join(argv)}` failed: {result.stderr.strip()}",
                          "check /etc/passwd and /etc/group (e.g. `getent passwd`), then run the command again")


def ensure(accounts: Accounts, comment: str, lock_path: Path) -> None:
    with _locked(lock_path):
        if not _group_exists(accounts.group):
            _check(["groupadd", "--system", accounts.group])
        for what, name in accounts.users().items():
            if not exists(name):
                # no home, no shell, no password: a user to run services as, never to log in as
                _check(["useradd", "--system", "--gid", accounts.group, "--no-create-home",
                        "--home-dir", "/nonexistent", "--shell", NOLOGIN, "--comment", f"{comment} {what}", name])


def processes_of(uid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def kill_all(uid: int, timeout: float = 10) -> None:
    """Kill every process of the user, wherever it runs: e.g. an epmd that a dying RabbitMQ
    started after its namespace was emptied, which would otherwise outlive the environment."""
    deadline = time.monotonic() + timeout
    while (pids := processes_of(uid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


SHARED_MEMORY = Path("/dev/shm")


def remove_shared_memory(uid: int, folder: Path = SHARED_MEMORY) -> None:
    """The user's POSIX shared memory and semaphores: a PostgreSQL killed rather than stopped
    leaves its dynamic shared memory segments (PostgreSQL.NNN) there, in RAM, after its user is
    gone."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == uid:
                os.unlink(entry.path)
        except OSError:
            continue


def remove(accounts: Accounts, lock_path: Path) -> list[str]:
    """Remove the users (and whatever still runs as them) and the group; the names of those removed."""
    removed = []
    with _locked(lock_path):
        for name in accounts.users().values():
            if exists(name):
                uid = pwd.getpwnam(name).pw_uid
                kill_all(uid)
                remove_shared_memory(uid)
                _check(["userdel", name])
                removed.append(name)
        if _group_exists(accounts.group):
            _check(["groupdel", accounts.group])
    return removed
