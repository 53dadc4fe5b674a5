"""A server of the local provider: a network namespace with a private directory on this machine."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path, PurePosixPath

from fabula.accounts import Accounts
from fabula.providers.base import SYSTEM_PATH, Host, Result, run_local
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
        if user and user != "root":
            prefix += ["setpriv", f"--reuid={user}", f"--regid={_ids(user)[1]}", "--init-groups"]
        return prefix + argv

    def _env(self, env: dict[str, str] | None, user: str | None) -> dict[str, str]:
        home = pwd.getpwnam(user).pw_dir if user else "/root"
        return {**BASE_ENV, "HOME": home, **(env or {})}

    def run(self, argv, *, user=None, env=None, input=None, timeout=120) -> Result:
        return run_local(self._argv(argv, user), input=input, env=self._env(env, user), timeout=timeout,
                         cwd=str(self.root) if os.path.isdir(self.root) else None)

    def interactive(self, argv: list[str], *, user=None, env=None) -> int:
        return subprocess.call(self._argv(argv, user), env=self._env(env, user))

    def put_file(self, path, content, *, mode=0o644, owner="root") -> bool:
        data = content.encode() if isinstance(content, str) else content
        uid, gid = _ids(owner)
        target = Path(path)
        try:
            st = target.stat()
            if (st.st_mode & 0o7777, st.st_uid) == (mode, uid) and target.read_bytes() == data:
                return False
        except FileNotFoundError:
            pass
        write_atomically(target, data, mode=mode)
        os.chown(target, uid, gid)
        return True

    def read_file(self, path) -> bytes | None:
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return None

    def make_dirs(self, paths, *, mode=0o755, owner="root") -> None:
        uid, gid = _ids(owner)
        for path in paths:
            Path(path).mkdir(parents=True, exist_ok=True)
            os.chown(path, uid, gid)
            os.chmod(path, mode)

    def fetch_file(self, path, local: Path) -> None:
        shutil.copyfile(path, local)

    def push_file(self, local: Path, path, *, mode=0o600, owner="root") -> None:
        uid, gid = _ids(owner)
        partial = Path(f"{path}.partial")
        shutil.copyfile(local, partial)
        os.chown(partial, uid, gid)
        os.chmod(partial, mode)
        partial.rename(path)

    def install_release(self, release_dir: str, release_id: str) -> PurePosixPath:
        target = self.path("releases", release_id)
        if not Path(target).exists():
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            partial = Path(f"{target}.partial")
            subprocess.run(["rm", "-rf", str(partial)], check=True)
            # hard links: a copy that costs no space and takes a fraction of a second
            subprocess.run(["cp", "-al", release_dir, str(partial)], check=True)
            partial.rename(target)
        return target

    def supervisor_pid(self, config: PurePosixPath) -> int | None:
        pidfile = Path(self.root, "run", "supervisord.pid")
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        return pid if str(config).encode() in cmdline else None

    def start_supervisor(self, config: PurePosixPath) -> None:
        if self.supervisor_pid(config) is None:
            self.check(["supervisord", "-c", str(config)])
