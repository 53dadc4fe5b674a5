"""Each server's process supervisor (supervisord): the programs a role runs, and their state.

Provider-neutral: it only writes files and runs supervisorctl on a Host.
"""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field

from fabula.errors import FabulaError
from fabula.providers.base import Host
from fabula.templates import render

RUNNING = "RUNNING"

# How a killed program comes back. A program that dies while RUNNING is started again at once
# (autorestart); one that dies before it has run STARTSECS is in BACKOFF and tried again after
# 1, 2, 3... s, STARTRETRIES times (55 s in all) before supervisord gives up on it (FATAL).
STARTSECS = 1
STARTRETRIES = 10
# supervisord's main loop sleeps up to 1 s in poll() unless a file descriptor wakes it, and it
# starts a dead program again only on the loop's next turn: about 1 s (up to 2 s) after the
# death. This program writes an empty line (to no log) every WAKEUP_INTERVAL seconds, so
# the loop turns that often and a killed program is started again within about 0.1-0.3 s.
# It costs a bash that sleeps in `read -t` (no fork) and ~0.1% of a CPU per supervisord.
WAKEUP = "fabula-wakeup"
WAKEUP_INTERVAL = 0.2


@dataclass(frozen=True)
class Program:
    name: str
    command: list[str]
    user: str = "root"
    environment: dict[str, str] = field(default_factory=dict)
    directory: str | None = None
    stopsignal: str = "TERM"
    stopwaitsecs: int = 10
    startsecs: int = STARTSECS
    startretries: int = STARTRETRIES
    logged: bool = True   # False: its output goes nowhere (stdout_logfile=NONE)


def _env_value(value: str) -> str:
    # supervisor interpolates %(...)s and splits on commas outside quotes
    return '"' + value.replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_program(program: Program, logdir: str) -> str:
    # supervisor keeps its own HOME (root's) for programs run as another user: give them one
    variables = {"HOME": program.directory or "/tmp", **program.environment}
    environment = ",".join(f"{k}={_env_value(v)}" for k, v in sorted(variables.items()))
    command = " ".join(shlex.quote(a) for a in program.command).replace("%", "%%")
    return render(__file__, "program.conf.j2", p=program, command=command,
                  environment=environment, logdir=logdir)


def wakeup_program() -> Program:
    # `read -t` times out (status > 128) on supervisord's stdin pipe, which never gets data; if
    # that pipe is ever closed (status 1) the loop ends rather than spinning
    script = f"while read -r -t {WAKEUP_INTERVAL} || [ $? -gt 128 ]; do echo; done"
    return Program(WAKEUP, ["bash", "-c", script], logged=False)


class Supervisor:
    def __init__(self, host: Host):
        self.host = host
        self.conf = host.path("supervisor", "supervisord.conf")
        self.programs_dir = host.path("supervisor", "programs")

    def ctl(self, *args: str, timeout: float = 120):
        return self.host.run(["supervisorctl", "-c", str(self.conf), *args], timeout=timeout)

    def is_running(self) -> bool:
        return self.ctl("pid", timeout=15).stdout.strip().isdigit()

    def ensure_running(self) -> None:
        self.host.make_dirs([self.host.path("supervisor"), self.programs_dir, self.host.path("log"),
                             self.host.path("run")])
        self.host.put_file(self.conf, render(__file__, "supervisord.conf.j2", name=self.host.name,
                                             root=str(self.host.root)))
        wakeup = render_program(wakeup_program(), str(self.host.path("log")))
        added = self.host.put_file(self.programs_dir / f"{WAKEUP}.conf", wakeup)
        if not self.is_running():
            self.host.check(["supervisord", "-c", str(self.conf)])
        if added:  # a supervisord started before this program existed
            self.ctl("reread")
            self.ctl("update")

    def apply(self, programs: list[Program]) -> set[str]:
        """Install exactly these programs; start new ones and restart changed ones. Returns those."""
        changed = set()
        for program in programs:
            text = render_program(program, str(self.host.path("log")))
            # 0600: a program's environment may hold the app's secrets
            if self.host.put_file(self.programs_dir / f"{program.name}.conf", text, mode=0o600):
                changed.add(program.name)
        # a program whose file was written by a run that was killed before `update` is unknown
        # to supervisord although its file is unchanged: add it too
        known = self.status()
        missing = {p.name for p in programs if p.name not in known}
        if changed or missing:
            self.ctl("reread")
            self.ctl("update")
        return changed | missing

    def status(self) -> dict[str, str]:
        """Program name -> supervisor state (RUNNING, STARTING, BACKOFF, FATAL, STOPPED...)."""
        result = self.ctl("status", timeout=15)
        states = {}
        for line in result.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and not line.startswith(("unix://", "error")):
                states[parts[0]] = parts[1]
        return states

    def restart(self, name: str) -> None:
        self.host.check(["supervisorctl", "-c", str(self.conf), "restart", name], timeout=300)

    def signal(self, name: str, sig: str) -> None:
        self.host.check(["supervisorctl", "-c", str(self.conf), "signal", sig, name])

    def wait_running(self, names: list[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = self.status()
            bad = {n: states.get(n, "MISSING") for n in names if states.get(n) != RUNNING}
            if not bad:
                return
            if time.monotonic() > deadline or any(s in ("FATAL", "BACKOFF") for s in bad.values()) and \
                    time.monotonic() > deadline - timeout / 2:
                detail = ", ".join(f"{n} is {s}" for n, s in bad.items())
                raise FabulaError(f"{self.host.name}: {detail}",
                                  f"see `fabula logs <env> {self.host.name} {next(iter(bad))}`")
            time.sleep(0.3)
