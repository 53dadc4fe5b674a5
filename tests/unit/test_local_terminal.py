"""`fabula manage` and `fabula db psql` run code of the app (or a database tool) as an unprivileged
user with root's terminal at hand. On a kernel with `dev.tty.legacy_tiocsti = 1`, a process whose
controlling terminal is root's can push keystrokes into it (TIOCSTI) that root's shell runs after
fabula exits. LocalHost.interactive gives the command a terminal and a session of its own instead.

Each test starts a stand-in for fabula (root, with a pseudo-terminal of the test's as its controlling
terminal, as an operator's shell would) that runs a small script as `nobody` through
LocalHost.interactive; the script tries TIOCSTI on every terminal it can reach. Nothing may arrive in
the operator's terminal, and what is typed and printed still goes through."""
from __future__ import annotations

import fcntl
import os
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from fabula.providers.local.host import LocalHost
from tests.helpers import REPO

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs a command as another user")

# the command, as `nobody`: read a line when it has a terminal, then push `echo INJECTED` into every
# terminal it holds, and say what it is (its controlling terminal, uid, no_new_privs)
COMMAND = r"""
import errno, fcntl, os, sys, termios
if os.isatty(0):
    print("ready", flush=True)
    print("got=" + sys.stdin.readline().strip(), flush=True)
fds = [0, 1, 2]
try:
    fds.append(os.open("/dev/tty", os.O_RDWR))
except OSError:
    pass
injected = []
for fd in fds:
    try:
        for byte in b"echo INJECTED\n":
            fcntl.ioctl(fd, termios.TIOCSTI, bytes([byte]))
        injected.append("yes")
    except OSError as exc:
        injected.append(errno.errorcode[exc.errno])
stat = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
nnp = [l.split()[1] for l in open("/proc/self/status") if l.startswith("NoNewPrivs:")][0]
print(f"ctty={stat[4]} uid={os.getuid()} nnp={nnp} tiocsti={','.join(injected)}", flush=True)
sys.exit(7)
"""

# fabula's stand-in: root, on the operator's terminal
OPERATOR = """
import sys
from pathlib import Path
from fabula.providers.local.host import LocalHost
host = LocalHost("worker1", "worker", "127.0.0.1", Path(sys.argv[1]), netns=None)
status = host.interactive(["/usr/bin/python3", "-c", sys.argv[2]], user="nobody")
Path(sys.argv[1], "status").write_text(str(status))
"""


def tty_nr(fd: int) -> int:
    """The terminal's device number as /proc/PID/stat writes a controlling terminal."""
    rdev = os.fstat(fd).st_rdev
    major, minor = os.major(rdev), os.minor(rdev)
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def as_operator(tmp_path: Path, stdin_is_tty: bool, typed: bytes = b"") -> tuple[str, str, bytes, int]:
    """Run OPERATOR with a new terminal as its controlling one (and as stdout/stderr, and stdin if
    asked); its status, everything the terminal showed, what was left in the terminal's input queue
    for the next program (the operator's shell) to read, and the terminal's number."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", OPERATOR, str(tmp_path), COMMAND], cwd=REPO,
            stdin=slave if stdin_is_tty else subprocess.DEVNULL, stdout=slave, stderr=slave,
            start_new_session=True, preexec_fn=lambda: fcntl.ioctl(1, termios.TIOCSCTTY, 0))  # noqa: PLW1509
        shown, deadline = b"", time.monotonic() + 60
        while proc.poll() is None or select.select([master], [], [], 0)[0]:
            assert time.monotonic() < deadline, f"no end; the terminal showed {shown!r}"
            if select.select([master], [], [], 0.1)[0]:
                shown += os.read(master, 1 << 16)
                if typed and b"ready" in shown:
                    os.write(master, typed)
                    typed = b""
            elif proc.poll() is not None:
                break
        # left in the terminal's input: whatever a program reading it next would get
        os.set_blocking(slave, False)
        left = b""
        while select.select([slave], [], [], 0.2)[0]:
            try:
                chunk = os.read(slave, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            left += chunk
        status = (tmp_path / "status").read_text() if (tmp_path / "status").exists() else f"exit {proc.returncode}"
        return status, shown.decode(errors="replace"), left, tty_nr(slave)
    finally:
        os.close(master)
        os.close(slave)


def report(shown: str) -> dict[str, str]:
    line = next(line for line in shown.splitlines() if line.startswith("ctty="))
    return dict(part.split("=", 1) for part in line.split())


def test_a_command_on_a_terminal_gets_its_own_and_cannot_type_into_the_operators(tmp_path):
    status, shown, left, outer = as_operator(tmp_path, stdin_is_tty=True, typed=b"hello\r")
    assert left == b"", f"the command typed {left!r} into the operator's terminal"
    assert status == "7", shown                      # its exit status
    assert "got=hello" in shown, shown               # what the operator typed reached it, its output came back
    seen = report(shown)
    assert seen["uid"] == "65534" and seen["nnp"] == "1", seen
    assert seen["ctty"] not in ("0", str(outer)), seen  # a terminal of its own


def test_a_command_without_a_terminal_on_stdin_has_no_controlling_terminal(tmp_path):
    status, shown, left, outer = as_operator(tmp_path, stdin_is_tty=False)
    assert left == b"", f"the command typed {left!r} into the operator's terminal"
    assert status == "7", shown
    seen = report(shown)                             # its output, on the operator's terminal
    assert seen["ctty"] == "0" and seen["uid"] == "65534", seen
    assert seen["tiocsti"] == "ENOTTY,EPERM,EPERM", seen  # stdout and stderr are the terminal, but not its own


def test_commands_run_as_a_user_get_no_new_privileges(tmp_path):
    host = LocalHost("worker1", "worker", "127.0.0.1", tmp_path, netns=None)
    argv = host._argv(["id"], "nobody")
    assert "--no-new-privs" in argv[:argv.index("id")]
    assert "--no-new-privs" not in host._argv(["id"], None)
    result = host.run(["grep", "NoNewPrivs", "/proc/self/status"], user="nobody")
    assert result.stdout.split() == ["NoNewPrivs:", "1"], result
