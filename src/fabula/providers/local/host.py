"""A server of the local provider: a network namespace with a private directory on this machine."""
from __future__ import annotations

import errno
import fcntl
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import termios
import tty
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
            # no new privileges: a setuid program (su, sudo...) or file capabilities cannot lift
            # the app's code (or a database tool) back to root
            prefix += [f"--reuid={user}", f"--regid={_ids(user)[1]}", "--init-groups", "--no-new-privs"]
        return prefix + argv

    def _env(self, env: dict[str, str] | None, user: str | None) -> dict[str, str]:
        home = pwd.getpwnam(user).pw_dir if user else "/root"
        return {**BASE_ENV, "HOME": home, **(env or {})}

    def run(self, argv, *, user=None, env=None, input=None, timeout=120) -> Result:
        return run_local(self._argv(argv, user), input=input, env=self._env(env, user), timeout=timeout,
                         cwd=str(self.root) if os.path.isdir(self.root) else None)

    def interactive(self, argv: list[str], *, user=None, env=None) -> int:
        """The command with the operator's terminal, which must not become the command's: code of
        the app (manage.py, its settings) that held root's terminal could type root's next command
        into it (TIOCSTI) or read what root types after it. Given a terminal, the command gets a
        pseudo-terminal of its own in a session of its own, and fabula relays the bytes (sudo's
        use_pty); otherwise it runs in a session of its own, with no controlling terminal at all."""
        command, environment = self._argv(argv, user), self._env(env, user)
        if not os.isatty(0):
            return subprocess.call(command, env=environment, start_new_session=True)
        return on_own_terminal(command, environment, owner=user)

    # -- the transport: the server's files are this machine's files -----------------------
    def read(self, path) -> bytes | None:
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, path, data: bytes, *, mode: int, owner: str) -> None:
        uid, gid = _ids(owner)
        # no fsync: a local server's files never outlive the machine's namespaces, and after a
        # crash `create` rewrites every file whose content differs. Each fsync waited on the
        # disk's journal, behind every other server's (0.1 s of a web server's create)
        write_atomically(Path(path), data, mode=mode, durable=False)
        os.chown(path, uid, gid)

    def make_dirs(self, paths: list[PurePosixPath], *, mode: int = 0o755, owner: str = "root") -> None:
        # as Host.make_dirs's `mkdir -p; chown; chmod`, without a process in the namespace (a
        # server's files are this machine's): about ten of them for each app server
        uid, gid = _ids(owner)
        for path in paths:
            os.makedirs(path, exist_ok=True)
            os.chown(path, uid, gid)
            os.chmod(path, mode)

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
        # a link to the build, which is root's and never changes once built: the servers of one
        # machine share its files, as hard links would, without making its thousands of folders
        # again for each server (Django's locales alone: 0.4-0.7 s of every launch here)
        os.symlink(local.resolve(), path)

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


# -- a pseudo-terminal of the command's own, relayed to the operator's ---------------------------

def _copy_window_size(source: int, target: int) -> None:
    try:
        fcntl.ioctl(target, termios.TIOCSWINSZ, fcntl.ioctl(source, termios.TIOCGWINSZ, bytes(8)))
    except OSError:
        pass


def on_own_terminal(argv: list[str], env: dict[str, str], owner: str | None = None) -> int:
    """Run argv on a new pseudo-terminal, as the leader of a new session whose controlling terminal
    it is, while this process relays the bytes between it and its own terminal (fd 0; raw meanwhile,
    the window size followed); the command's exit status. Its stdout and stderr are the new terminal
    where this process has a terminal, else this process's own (a redirected output stays clean).
    TIOCSTI, which needs the target to be the caller's controlling terminal, reaches only the new one.
    A ^Z typed suspends nothing: the command's process group has no parent in its session, so the
    kernel drops the stop signals of its terminal."""
    master, slave = os.openpty()  # both close on exec
    try:
        if owner and owner != "root":  # the command's own, like a login's (sudo does the same)
            os.fchown(slave, *_ids(owner))
        termios.tcsetattr(slave, termios.TCSANOW, termios.tcgetattr(0))
        _copy_window_size(0, master)
        streams = [slave if os.isatty(fd) else fd for fd in (1, 2)]
        # `setsid --ctty` execs in place (the child of Popen leads no process group, so it does not
        # fork): a new session, then the terminal on its stdin made the controlling one
        proc = subprocess.Popen(["setsid", "--ctty", *argv], env=env, stdin=slave, stdout=streams[0],
                                stderr=streams[1])
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    out = 1 if os.isatty(1) else 2
    saved = termios.tcgetattr(0)
    winch = signal.getsignal(signal.SIGWINCH)
    try:
        try:
            signal.signal(signal.SIGWINCH, lambda *_: _copy_window_size(0, master))
        except ValueError:  # not the main thread: the window size stays as it was
            winch = None
        tty.setraw(0, termios.TCSADRAIN)  # what is typed goes to the command as typed (^C included)
        _relay(master, proc, out)
        return proc.wait()
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)
        if winch is not None:
            signal.signal(signal.SIGWINCH, winch)
        os.close(master)
        if proc.poll() is None:  # fabula was interrupted: the command goes too
            proc.kill()
            proc.wait()


def _relay(master: int, proc: subprocess.Popen, out: int) -> None:
    """Bytes from fd 0 to the master, from the master to `out`, until the command has exited and
    its output is drained (a daemon it left holding the terminal is not waited for)."""
    os.set_blocking(master, False)
    exited = os.pidfd_open(proc.pid)
    pending = bytearray()  # typed, not yet taken by the terminal
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ)
    selector.register(master, selectors.EVENT_READ)
    selector.register(exited, selectors.EVENT_READ)
    master_open = True

    def to_operator(data: bytes) -> None:
        nonlocal out
        while data and out >= 0:
            try:
                data = data[os.write(out, data):]
            except OSError:  # the operator's terminal is gone: the output goes nowhere
                out = -1

    def from_master() -> bool:
        """Relay what the command wrote; False when nothing is there or no one holds its end (EIO)."""
        nonlocal master_open
        try:
            data = os.read(master, 1 << 16)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            data = b""
        if not data:
            master_open = False
        to_operator(data)
        return bool(data)

    try:
        while True:
            for key, events in selector.select():
                if key.fd == exited:
                    while master_open and from_master():
                        pass
                    return
                if key.fd == 0:
                    try:
                        data = os.read(0, 1 << 16)
                    except OSError:
                        data = b""
                    if not data:  # the operator's terminal hung up
                        selector.unregister(0)
                    pending += data
                elif key.fd == master and master_open:
                    if events & selectors.EVENT_READ:
                        from_master()
                    if master_open and events & selectors.EVENT_WRITE and pending:
                        try:
                            del pending[:os.write(master, pending)]
                        except BlockingIOError:
                            pass
                        except OSError:  # EIO: no one holds the terminal's end any more
                            master_open = False
            if not master_open:  # the command closed its terminal but runs on: await its end
                if master in selector.get_map():
                    selector.unregister(master)
                pending.clear()
            else:
                selector.modify(master, selectors.EVENT_READ | (selectors.EVENT_WRITE if pending else 0))
    finally:
        selector.close()
        os.close(exited)
