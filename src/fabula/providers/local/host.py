"""A server of the local provider: a network namespace with a private directory on this machine."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path, PurePath, PurePosixPath

from fabula.accounts import Accounts
from fabula.providers.base import SYSTEM_PATH, FileState, Host, Result, run_local
from fabula.state import write_atomically

BASE_ENV = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"}


def _ids(owner: str) -> tuple[int, int]:
    entry = pwd.getpwnam(owner)
    return entry.pw_uid, entry.pw_gid


class LocalHost(Host):
    """Runs commands inside the server's namespace (or the machine's own, when netns is None)."""

    def __init__(self, name: str, role: str, address: str, root: Path, netns: str | None,
                 accounts: Accounts | None = None):
        self.name, self.role, self.address = name, role, address
        self.accounts = accounts or Accounts("")
        self.root = PurePosixPath(root)
        self.netns = netns

    def _argv(self, argv: list[str], user: str | None) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        # `ip netns exec` execs in place, so setpriv's parent is fabula itself: if fabula is killed
        # mid-command, the command dies with it instead of racing the next run's cleanup (an orphaned
        # initdb kept writing into the directory the next `create` was removing). Daemons fork, and
        # a forked child does not inherit the signal.
        prefix += ["setpriv", "--pdeathsig=KILL"]
        if user and user != "root":
            prefix += [f"--reuid={user}", f"--regid={_ids(user)[1]}", "--init-groups"]
        return prefix + argv

    def _env(self, env: dict[str, str] | None, user: str | None) -> dict[str, str]:
        home = pwd.getpwnam(user).pw_dir if user else "/root"
        return {**BASE_ENV, "HOME": home, **(env or {})}

    def run(self, argv, *, user=None, env=None, input=None, timeout=120) -> Result:
        return run_local(self._argv(argv, user), input=input, env=self._env(env, user), timeout=timeout,
                         cwd=str(self.root) if os.path.isdir(self.root) else None)

    def interactive(self, argv: list[str], *, user=None, env=None) -> int:
        return subprocess.call(self._argv(argv, user), env=self._env(env, user))

    # -- the transport: the server's files are this machine's files -----------------------
    def read(self, path) -> bytes | None:
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, path, data: bytes, *, mode: int, owner: str) -> None:
        uid, gid = _ids(owner)
        write_atomically(Path(path), data, mode=mode)
        os.chown(path, uid, gid)

    def stat(self, path) -> FileState | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = str(st.st_uid)
        return FileState(st.st_mode & 0o7777, owner)

    def copy_tree(self, local: Path, path) -> None:
        # hard links: a copy that costs no space and takes a fraction of a second
        subprocess.run(["cp", "-al", str(local), str(path)], check=True)

    def fetch(self, path, local: Path) -> None:
        shutil.copyfile(path, local)

    def push(self, local: Path, path, *, mode=0o600, owner="root") -> None:
        uid, gid = _ids(owner)
        partial = Path(f"{path}.partial")
        shutil.copyfile(local, partial)
        os.chown(partial, uid, gid)
        os.chmod(partial, mode)
        partial.rename(path)

    def supervisor_pid(self, config: PurePath) -> int | None:
        pidfile = Path(self.root, "run", "supervisord.pid")
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):  # no pidfile, or the process gone (ENOENT, ESRCH)
            return None
        return pid if str(config).encode() in cmdline else None
