"""The load balancer's socket holder: the listening socket outlives the server behind it, so a
client that connects while the server is dead waits and is served by the restarted one."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from fabula.sample import free_port
from tests.helpers import wait_for

# serves "pid\n" to every connection on the inherited fd 3
SERVER = """
import os, socket
listener = socket.socket(fileno=3)
while True:
    conn, _ = listener.accept()
    conn.sendall(f"{os.getpid()}\\n".encode())
    conn.close()
"""


def ask(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        return conn.recv(100).decode().strip()


def gone(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def test_the_socket_survives_its_server_killed_and_a_waiting_client_is_served(tmp_path: Path):
    port, pidfile = free_port(), tmp_path / "server.pid"
    holder = subprocess.Popen([sys.executable, "-m", "fabula.providers.haproxy.socket_holder",
                               "--listen", f"127.0.0.1:{port}", "--pidfile", str(pidfile),
                               "--", sys.executable, "-c", SERVER])
    try:
        first = wait_for(lambda: ask(port), timeout=20, message="the first server answering")
        # the holder writes the pid once the server is started, which may answer before that
        wait_for(lambda: pidfile.read_text().strip() == first, timeout=10, message="the pidfile naming it")
        os.killpg(int(first), signal.SIGKILL)  # the server's whole process group: not the holder
        # gone (or a zombie), so that it cannot take the next connection as it dies
        wait_for(lambda: gone(first), timeout=10, message="the killed server gone")
        # connecting at once is not refused: the connection waits in the backlog
        second = ask(port)
        assert second != first and holder.poll() is None
        wait_for(lambda: pidfile.read_text().strip() == second, timeout=10, message="the pidfile naming the new one")
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=20)
    # the holder stopped its server on the way out, and the port is free again
    assert not Path(f"/proc/{second}").exists()
    with socket.socket() as probe:  # SO_REUSEADDR: only a listening socket makes this fail
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
