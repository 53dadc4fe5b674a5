"""The load balancer's listening sockets, held outside HAProxy (what systemd's socket activation
does for a service): this small process binds them, passes them to HAProxy as fd 3, 4, ... (its
configuration says `bind fd@3`), and starts HAProxy again at once if it dies. Connections that
arrive while HAProxy is down wait in the sockets' backlog instead of being refused; only the
requests HAProxy had in flight are lost.

HAProxy runs in its own process group, so a fault that kills HAProxy's processes leaves this one
(and the sockets) alone. Signals from the supervisor are passed on: USR2 reloads HAProxy (its
master starts new workers on the same sockets), USR1 (the supervisor's stop) and TERM stop it,
and this process exits with it.

Run by the load balancer's supervisord as root, from a copy of this file beside HAProxy's
configuration (it needs nothing but Python 3's standard library, so it runs on any host):
    python3 -I socket_holder.py --listen ADDR:PORT ... --pidfile F -- haproxy ...
"""
from __future__ import annotations

import argparse
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

FIRST_FD = 3
BACKLOG = 4096
RESPAWN_DELAY = 0.05   # a HAProxy that dies at once is started again at most this often...
MAX_RESPAWN_DELAY = 2.0  # ...backing off to this while it keeps dying within STABLE seconds
STABLE = 5.0
BIND_TIMEOUT = 10.0


def log(message: str) -> None:
    print(f"socket holder: {message}", file=sys.stderr, flush=True)


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def stop_leftover(pidfile: Path) -> None:
    """A HAProxy started by an earlier holder that was killed still holds the ports: it is told to
    stop listening (USR1, a soft stop: it finishes its connections) so that they can be bound."""
    pid = running_haproxy(pidfile)
    if pid is not None:
        os.kill(pid, signal.SIGUSR1)
        log(f"asked the HAProxy left by an earlier holder (pid {pid}) to stop listening")


def running_haproxy(pidfile: Path) -> int | None:
    """The pid `pidfile` names if that process is a HAProxy still running."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if is_haproxy(pid) else None


def is_haproxy(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"haproxy")
    except OSError:
        return False


def bind(address: str) -> socket.socket:
    host, port = parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + BIND_TIMEOUT
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        # never SO_REUSEPORT: no other process (another environment's HAProxy) can share the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(BACKLOG)
            return sock
        except OSError as exc:
            sock.close()
            if time.monotonic() > deadline:
                raise SystemExit(f"socket holder: cannot listen on {address}: {exc.strerror}") from None
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", action="append", required=True, help="ADDR:PORT, in fd order from 3")
    parser.add_argument("--pidfile", type=Path, required=True, help="where HAProxy's pid is written")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    stop_leftover(args.pidfile)
    # bound first, then moved to 3, 4, ... by way of high numbers (a new socket may itself be 3)
    high = []
    for address in args.listen:
        sock = bind(address)
        high.append(fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 100))
        sock.close()
    fds = [FIRST_FD + offset for offset in range(len(high))]
    for fd, target in zip(high, fds, strict=True):
        os.dup2(fd, target)  # dup2's copy is inheritable
        os.close(fd)

    child: subprocess.Popen | None = None
    stopping = False

    def forward(signum, _frame):
        nonlocal stopping
        if signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)

    delay = RESPAWN_DELAY / 2  # doubled on the first quick exit: RESPAWN_DELAY
    while not stopping:
        started = time.monotonic()
        child = subprocess.Popen(command, pass_fds=fds, start_new_session=True)
        args.pidfile.write_text(f"{child.pid}\n")
        code = child.wait()
        if stopping:
            return 0 if code in (0, -signal.SIGTERM, -signal.SIGUSR1) else code
        delay = RESPAWN_DELAY if time.monotonic() - started > STABLE else min(delay * 2, MAX_RESPAWN_DELAY)
        log(f"HAProxy (pid {child.pid}) exited with {code}; starting it again in {delay:.2f}s")
        time.sleep(delay)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
