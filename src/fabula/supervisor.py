"""Each server's process supervisor (supervisord): the programs a role runs, and their state.

Provider-neutral: it only writes files and runs supervisorctl on a Host; how supervisord is started
is the Host's to say (Host.start_supervisord: under the server's service manager where the provider
made one, directly otherwise).
"""
from __future__ import annotations

import shlex
import time
import xmlrpc.client
from dataclasses import dataclass, field

from fabula.errors import FabulaError
from fabula.providers.base import Host, poll
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
# seconds a supervisord started by the host's service manager (which returns before it answers)
# may take until supervisorctl reaches it
START_WAIT = 30
# supervisord's XML-RPC faults (supervisor/xmlrpc.py Faults) that supervisorctl does not count as errors
BAD_NAME, ALREADY_STARTED, NOT_RUNNING = 10, 60, 70


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


class Unavailable(FabulaError):
    """supervisord does not answer on the server's socket (not started, gone, the host away)."""


class SupervisorFault(FabulaError):
    """supervisord refused a call (its XML-RPC fault: `code`, e.g. NOT_RUNNING)."""

    def __init__(self, code: int, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.code = code


class Supervisor:
    def __init__(self, host: Host):
        self.host = host
        self.conf = host.path("supervisor", "supervisord.conf")
        self.programs_dir = host.path("supervisor", "programs")
        self.socket = host.path("run", "supervisor.sock")   # supervisord.conf.j2's unix_http_server

    def rpc(self, method: str, *params, timeout: float = 120):
        """supervisord's XML-RPC method supervisor.METHOD, as supervisorctl calls it, with curl on
        the server (supervisorctl's start-up alone takes 0.3-1 s of CPU, and create, deploy and
        describe ask each server dozens of times). Raises Unavailable, or SupervisorFault."""
        body = xmlrpc.client.dumps(tuple(params), f"supervisor.{method}", allow_none=True)
        result = self.host.run(["curl", "-sS", "--max-time", str(int(timeout)), "--unix-socket", str(self.socket),
                                "-H", "Content-Type: text/xml", "-H", "Expect:", "--data-binary", "@-",
                                "http://localhost/RPC2"], input=body, timeout=timeout + 10)
        if not result.ok or not result.stdout.lstrip().startswith("<?xml"):
            raise Unavailable(f"{self.host.name}: supervisord does not answer on {self.socket}: "
                              f"{(result.stderr or result.stdout).strip()[-300:] or f'exit {result.returncode}'}")
        try:
            (value,), _ = xmlrpc.client.loads(result.stdout)
        except xmlrpc.client.Fault as fault:
            what = " ".join([method, *map(str, params)])
            raise SupervisorFault(fault.faultCode, f"{self.host.name}: supervisord refuses {what}: {fault.faultString}",
                                  f"see `fabula logs <env> {self.host.name}`") from None
        return value

    def is_running(self) -> bool:
        try:
            return isinstance(self.rpc("getPID", timeout=15), int)
        except (Unavailable, SupervisorFault):
            return False

    def ensure_running(self) -> None:
        self.host.make_dirs([self.host.path("supervisor"), self.programs_dir, self.host.path("log"),
                             self.host.path("run")])
        self.host.put_file(self.conf, render(__file__, "supervisord.conf.j2", name=self.host.name,
                                             root=str(self.host.root)))
        wakeup = render_program(wakeup_program(), str(self.host.path("log")))
        added = self.host.put_file(self.programs_dir / f"{WAKEUP}.conf", wakeup)
        if not self.is_running():
            start = self.host.start_supervisord
            if start is not None and start():
                self._wait_started()
            else:
                # it daemonizes once its socket listens: it answers when this returns
                self.host.check(["supervisord", "-c", str(self.conf)])
        if added:  # a supervisord started before this program existed
            self.update()

    def _wait_started(self) -> None:
        if not poll(self.is_running, START_WAIT, interval=0.2):
            raise FabulaError(f"{self.host.name}: supervisord was started but does not answer after {START_WAIT} s",
                              f"see {self.host.path('log', 'supervisord.log')} and the host's journal "
                              "(`journalctl -e`) on the host")

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
            self.update()
        return changed | missing

    def update(self) -> None:
        """supervisorctl's `update`: the program files read again; groups removed, replaced, added."""
        added, changed, removed = self.rpc("reloadConfig")[0]
        for group in removed + changed:
            self.rpc("stopProcessGroup", group, timeout=300)
            self.rpc("removeProcessGroup", group)
        for group in changed + added:
            self.rpc("addProcessGroup", group, timeout=300)

    def status(self) -> dict[str, str]:
        """Program name -> supervisor state (RUNNING, STARTING, BACKOFF, FATAL, STOPPED...); none
        when supervisord does not answer."""
        try:
            return {info["name"]: info["statename"] for info in self.rpc("getAllProcessInfo", timeout=15)}
        except Unavailable:
            return {}

    def start(self, name: str, timeout: float = 120) -> None:
        """Start `name` and wait until it has run startsecs; one already running is left as it is."""
        self._ignoring((ALREADY_STARTED,), "startProcess", name, timeout=timeout)

    def stop(self, name: str, timeout: float = 120) -> None:
        """Stop `name` and wait until it has exited; one not running, or not there (e.g. a fenced
        primary's PostgreSQL), is left as it is."""
        self._ignoring((NOT_RUNNING, BAD_NAME), "stopProcess", name, timeout=timeout)

    def restart(self, name: str, timeout: float = 300) -> None:
        self.stop(name, timeout)
        self.start(name, timeout)

    def signal(self, name: str, sig: str) -> None:
        self.rpc("signalProcess", name, sig)

    def shutdown(self) -> None:
        """supervisord stops its programs and exits (nothing to do if it does not answer)."""
        try:
            self.rpc("shutdown", timeout=60)
        except Unavailable:
            return
        poll(lambda: not self.is_running(), 60, interval=0.2)

    def _ignoring(self, faults: tuple[int, ...], method: str, name: str, timeout: float) -> None:
        try:
            self.rpc(method, name, timeout=timeout)
        except SupervisorFault as exc:
            if exc.code not in faults:
                raise

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
