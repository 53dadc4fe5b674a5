"""What the benchmarks share: running the real `fabula` CLI on a throw-away copy of the sample app,
the paths of an environment on the local provider, polling with a deadline, /proc accounting,
cleanup (also on Ctrl-C), and printing tables and results.

The benchmarks run as scripts (`.venv/bin/python bench/NAME.py`), so this module is imported as
`harness` (the script's own folder is first on sys.path). It imports nothing from `tests/`; what
the tests also use (the sample app's repository, the CLI, free ports, load) comes from
`fabula.sample`, the one copy both share.
"""
from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

from fabula.sample import Run, free_port, local_keys, make_app_repo, run_fabula

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
SAMPLE_APP = REPO / "examples" / "polls"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
TEMP_PARENT = "/var/tmp"  # not /tmp's 0700 folders: service users (postgres, www-data) must traverse it

PGBIN = Path("/usr/lib/postgresql/15/bin")
PGBENCH, PSQL = str(PGBIN / "pgbench"), str(PGBIN / "psql")
CLK_TCK = os.sysconf("SC_CLK_TCK")
NOISY = 0.3  # cores used by other processes during a run above which its figures are suspect


class BenchError(Exception):
    """A step failed; the message says which, with the relevant output or log tail."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def require_root(script: str, why: str = "the local provider makes network namespaces") -> None:
    if os.geteuid() != 0:
        print(f"bench/{script} needs root ({why})", file=sys.stderr)
        raise SystemExit(2)


# --------------------------------------------------------------------------- the fabula CLI


MADE: list[Environment] = []  # every Environment.new of this run, for the cleanup's check


@dataclass
class Environment:
    """One environment of the sample app on the local provider, and where its parts are."""

    project: str
    name: str
    app_dir: Path
    state_dir: Path
    https_port: int
    http_port: int

    @classmethod
    def new(cls, base: Path, project: str, name: str, servers: str, extra: str = "",
            app_dir: Path | None = None) -> Environment:
        """A new (not yet created) environment: its app repository under `base` (at `app_dir`,
        by default base/<project>), the state directory base/state, two free ports."""
        env = cls(project=project, name=name, app_dir=app_dir or base / project, state_dir=base / "state",
                  https_port=free_port(), http_port=free_port())
        MADE.append(env)
        make_app_repo(env.app_dir, project, name, local_keys(env.https_port, env.http_port) + extra, servers=servers)
        return env

    @property
    def env_dir(self) -> Path:
        return self.state_dir / self.project / self.name

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def db(self) -> str:
        return self.project.replace("-", "_")

    @property
    def ns_prefix(self) -> str:
        return f"fab.{self.project}.{self.name}."

    def netns(self, server: str) -> str:
        return self.ns_prefix + server

    def socket_dir(self, server: str) -> Path:
        """PostgreSQL's unix socket folder on a database server."""
        return self.env_dir / "servers" / server / "run" / "postgresql"

    def log_file(self, server: str, name: str) -> Path:
        return self.env_dir / "servers" / server / "log" / name

    def state(self) -> dict:
        return json.loads((self.env_dir / "state.json").read_text())

    def address(self, server: str) -> str:
        return self.state()["servers"][server]["address"]

    def primary(self) -> str:
        return next(n for n, s in self.state()["servers"].items() if s["role"] == "db-primary")

    def app_password(self) -> str:
        return json.loads((self.env_dir / "secrets" / "secrets.json").read_text())["db_app_password"]

    def fabula(self, *args: str, timeout: float = 600) -> Run:
        return run_fabula(*args, cwd=self.app_dir, state_dir=self.state_dir, timeout=timeout)

    def describe(self) -> dict:
        return json.loads(self.fabula("describe", self.name, "--json").stdout)

    def web_health(self) -> dict[str, str]:
        """Each web server's status in the load balancer, from `fabula describe` (the group's
        members: not its warm pool, which is out of the load balancer)."""
        return {s["name"]: s["lb"] for s in self.describe()["servers"] if s["role"] == "web" and not s.get("warm")}

    def destroy(self, attempts: int = 1, timeout: float = 600) -> str | None:
        """`fabula destroy`, tried up to `attempts` times; an error message, or None."""
        problem = None
        for _ in range(attempts):
            try:
                result = self.fabula("destroy", self.name, "--yes", timeout=timeout)
                problem = None if result.returncode == 0 else f"rc {result.returncode}: {result.stderr[-1500:]}"
            except subprocess.TimeoutExpired:
                problem = "timed out"
            if problem is None:
                break
        return problem


# --------------------------------------------------------------------------- ports and polling


def wait_for(condition: Callable[[], T], timeout: float, interval: float = 0.2, message: str = "condition",
             check: Callable[[], None] | None = None) -> T:
    """Poll `condition` until it returns something truthy, and return that; BenchError after
    `timeout` seconds. The condition's own exceptions are retried until the deadline (the last
    one is reported); `check`, called before each attempt, may raise to give up at once (e.g. a
    server the condition waits for has exited)."""
    deadline = time.monotonic() + timeout
    last = "never true"
    while True:
        if check is not None:
            check()
        try:
            value = condition()
            if value:
                return value
            last = f"last result {value!r}"
        except Exception as exc:  # retried until the deadline
            last = f"last error: {type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise BenchError(f"waited {timeout:g} s for {message}, in vain ({last})")
        time.sleep(interval)


def timed_wait(condition: Callable[[], Any], timeout: float, interval: float = 0.2,
               message: str = "condition") -> float:
    """wait_for; the seconds it took."""
    started = time.monotonic()
    wait_for(condition, timeout, interval, message)
    return time.monotonic() - started


# --------------------------------------------------------------------------- processes and /proc


def proc_stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (0 = state, 1 = ppid, 11 = utime, 12 = stime,
    13 = cutime, 14 = cstime, 19 = start time), or None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children_of(pid: int) -> list[tuple[int, str]]:
    """Direct children of PID as (pid, start time), the start time guarding against pid reuse."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = proc_stat(entry.name)
            if st and int(st[1]) == pid:
                found.append((int(entry.name), st[19]))
    return found


def cpu_seconds(pid: int, with_children: bool = False) -> float:
    """CPU time (user + system) of PID, all threads; with its reaped and its live children if asked."""
    st = proc_stat(pid)
    if st is None:
        return 0.0
    ticks = int(st[11]) + int(st[12])
    if with_children:
        ticks += int(st[13]) + int(st[14])  # children already reaped
        for child, _ in children_of(pid):
            cst = proc_stat(child)
            if cst:
                ticks += int(cst[11]) + int(cst[12])
    return ticks / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent not idle, summed over all CPUs (from /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return (total - values[3] - values[4]) / CLK_TCK


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def environment_processes(ns_prefixes: Iterable[str], needles: Iterable[bytes] = ()) -> Iterator[Path]:
    """/proc/PID of every process in a network namespace whose name starts with one of
    `ns_prefixes`, or whose command line contains one of `needles` (e.g. an environment's
    directory: the load balancer and the autoscaler run outside the servers' namespaces)."""
    prefixes, needles = tuple(ns_prefixes), list(needles)
    run = Path("/run/netns")
    inodes = {p.stat().st_ino for p in run.iterdir() if p.name.startswith(prefixes)} if run.exists() else set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.stat(proc / "ns" / "net").st_ino in inodes or any(n in (proc / "cmdline").read_bytes()
                                                                     for n in needles):
                yield proc
        except OSError:
            continue


def kill_namespace(netns: str) -> int:
    """SIGKILL every process of a network namespace; how many there were."""
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                          check=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def my_children() -> list[int]:
    me = str(os.getpid())
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and (proc_stat(p.name) or ["", ""])[1] == me]


def terminate_my_children() -> None:
    """SIGTERM this script's children (e.g. a create or pgbench still running after an interrupt)."""
    for pid in my_children():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def leftovers(envs: Iterable[Environment]) -> list[str]:
    """What of these environments is still on the machine: namespaces, processes."""
    envs = list(envs)
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    found = [f"namespace {n}" for n in names if n.startswith(tuple(e.ns_prefix for e in envs))]
    needles = [str(e.env_dir).encode() for e in envs]
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if any(n in (proc / "cmdline").read_bytes() for n in needles):
                    found.append(f"process {proc.name}")
            except OSError:
                pass
    return found


def remove_unless_left(base: Path, envs: Iterable[Environment] | None = None) -> list[str]:
    """Remove the run's throw-away folder, unless something of its environments (by default every
    one made by Environment.new under `base`) is still on the machine, e.g. after a failed
    destroy: then the folder is kept, since its state is what `fabula destroy` needs, and how
    to destroy by hand is printed. What is left (see leftovers)."""
    envs = [e for e in MADE if base in e.state_dir.parents] if envs is None else list(envs)
    left = leftovers(envs) if envs else []
    if left:
        print(f"LEFT on the machine: {', '.join(left)}. Kept {base}; destroy by hand:", file=sys.stderr)
        for e in envs:
            if leftovers([e]):
                print(f"  cd {e.app_dir} && FABULA_STATE_DIR={e.state_dir} {sys.executable} -m fabula destroy "
                      f"{e.name} --yes", file=sys.stderr)
    else:
        shutil.rmtree(base, ignore_errors=True)
    return left


def interrupt_on_signals() -> None:
    """SIGTERM and SIGHUP end the run like Ctrl-C, so that its cleanup runs."""
    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def ignore_interrupts() -> None:
    """From here on (the cleanup), a second Ctrl-C or SIGTERM does not interrupt."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def temp_base(prefix: str) -> Path:
    """A throw-away folder under /var/tmp that service users can traverse (0755)."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=TEMP_PARENT))
    base.chmod(0o755)
    return base


# --------------------------------------------------------------------------- PostgreSQL tools


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without any PG* variable (PGSERVICE, PGSSLMODE... would skew the runs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C.UTF-8", **extra)
    return env


def as_postgres() -> list[str]:
    """A command prefix that runs the rest as the postgres user (setpriv execs: same pid)."""
    gid = pwd.getpwnam("postgres").pw_gid
    return ["setpriv", "--reuid=postgres", f"--regid={gid}", "--init-groups"]


def as_owner_of(path: Path) -> list[str]:
    """A command prefix that runs the rest as the user and group owning `path`: e.g. an
    environment's own database user, who alone may use its PostgreSQL socket folder (0700) and
    whom pg_ident maps to the `postgres` role."""
    info = os.stat(path)
    return ["setpriv", f"--reuid={info.st_uid}", f"--regid={info.st_gid}", "--clear-groups"]


def field_of(pattern: str, text: str, cast: Callable[[str], Any] = float, default: Any = None) -> Any:
    """A figure of pgbench's output: the first group of `pattern`, cast; `default` if absent (or
    BenchError if there is no default)."""
    m = re.search(pattern, text)
    if not m:
        if default is not None:
            return default
        raise BenchError(f"pgbench output has no {pattern!r}:\n{text}")
    return cast(m.group(1))


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- load


# --------------------------------------------------------------------------- output


def console(width: int) -> Console:
    """The terminal's width on a terminal; `width` columns when the output goes to a file."""
    return Console() if sys.stdout.isatty() else Console(width=width)


def table(title: str, columns: Iterable[str], left: Iterable[str] = (), **options: Any) -> Table:
    """A table with these columns, right-aligned (figures) except those named in `left`."""
    left = set(left)
    made = Table(title=title, **options)
    for column in columns:
        made.add_column(column, justify="left" if column in left else "right")
    return made


def save_results(name: str, data: Any) -> Path:
    """bench/results/NAME.json (the folder is not versioned)."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path
