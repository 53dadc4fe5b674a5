"""fabula's program on a fixed inventory (`provider: ssh`), whose hosts are not fabula's to
replace: it watches them. A host whose SSH port has not answered for DOWN_AFTER rounds in a row
is recorded as down (the history, `fabula describe`); when it answers again, its supervisor is
started again (its firewall first), and with it every service of its role. Where systemd runs,
the server's unit does that at boot too; where it does not, nothing else would. A fenced
former primary is left as it is: only `fabula db reset-replicas` brings it back, as a replica.
The load balancer's host runs the program itself: it is not watched."""
from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fabula.context import Context
from fabula.errors import FabulaError
from fabula.supervisor import Supervisor

DOWN_AFTER = 3        # rounds without an answer before a host counts as down
PROBE_TIMEOUT = 2.0   # seconds a host's SSH port may take to accept a connection
RESTART_TIMEOUT = 120.0


def answers(address: str, port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """The host's sshd accepts a connection and greets (a host that is up, whatever fabula runs)."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(8).startswith(b"SSH-")
    except OSError:
        return False


@dataclass
class HostWatch:
    """Each host's misses in a row, and whether it is down (and recorded so)."""

    misses: dict[str, int] = field(default_factory=dict)
    down: dict[str, float] = field(default_factory=dict)       # host -> since (wall clock)
    recorded: set[str] = field(default_factory=set)

    def observe(self, answered: dict[str, bool]) -> tuple[list[str], list[str]]:
        """The hosts to record as down, and those to bring back (down, and answering again)."""
        for name in list(self.misses):
            if name not in answered:   # no longer in the inventory
                self.forget(name)
        to_record, to_restart = [], []
        for name, ok in sorted(answered.items()):
            if ok:
                self.misses[name] = 0
                if name in self.down:
                    to_restart.append(name)
                continue
            self.misses[name] = self.misses.get(name, 0) + 1
            if self.misses[name] >= DOWN_AFTER:
                self.down.setdefault(name, time.time())
                if name not in self.recorded:
                    to_record.append(name)
        return to_record, to_restart

    def forget(self, name: str) -> None:
        self.misses.pop(name, None)
        self.down.pop(name, None)
        self.recorded.discard(name)


def probe(ctx: Context) -> dict[str, bool]:
    """Every host of the inventory but the load balancer's, at once: answering or not."""
    port = ctx.env.ssh.port if ctx.env.ssh is not None else 22
    hosts = {name: h.address for name, h in ctx.env.hosts.items() if h.role != "lb"}
    if not hosts:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        found = pool.map(lambda address: answers(address, port), hosts.values())
        return dict(zip(hosts, found, strict=True))


def bring_back(ctx: Context, name: str) -> dict:
    """A host answering again: its firewall, its supervisor and its programs running again."""
    record = ctx.state.servers.get(name)
    if record is None:
        return {"restarted": False, "why": "not a server of the environment's state"}
    if record.rebuild:
        return {"restarted": False, "why": "fenced: `fabula db reset-replicas` rebuilds it as a replica"}
    # its firewall too: where systemd does not run, the supervisor's start loads the last one
    # fabula confirmed, as the server's unit does at boot (not one made again here, which would
    # admit this program's address rather than the operators')
    supervisor = Supervisor(ctx.host(name))
    supervisor.ensure_running()
    programs = sorted(supervisor.status())
    if not programs:
        raise FabulaError(f"{name}: its supervisor runs no program", f"run `fabula create {ctx.env_name}`")
    supervisor.wait_running(programs, timeout=RESTART_TIMEOUT)
    return {"restarted": True, "programs": programs}
