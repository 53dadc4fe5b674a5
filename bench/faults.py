"""Faults under load: each service of the sample app's environment killed in turn (kill -9 of its
whole process group), one at a time, while two clients run through the load balancer (one keeps a
session, GET /api/session, over one keep-alive connection; one queries the database,
GET /api/entries, on a new connection per request). For each fault: how long until the service
serves again, how much of that was its supervisor's delay in starting it again (the rest is the
service's own start time), and the requests that failed meanwhile.

"back after" is measured from the kill to the service serving: a TCP connection accepted (nginx,
PgBouncer, Redis, RabbitMQ, HAProxy), gunicorn answering its health check, PostgreSQL answering
pg_isready, Celery logging "ready", celery beat logging "Starting", the autoscaler's new process
running. "restart delay" is the kill to the new process's start (its /proc start time).

Run as root: `.venv/bin/python bench/faults.py [--keep]`.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
SAMPLE_APP = REPO / "examples" / "polls"
ENV = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PG_ISREADY = next((p for p in ("/usr/lib/postgresql/15/bin/pg_isready", "/usr/bin/pg_isready") if Path(p).exists()),
                  "pg_isready")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_app(target: Path, project: str, https_port: int, http_port: int) -> Path:
    shutil.copytree(SAMPLE_APP, target, ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3"))
    (target / "fabula.yml").write_text(f"""project: {project}
app:
  source: .
  wsgi: polls.wsgi:application
  settings: polls.settings
  requirements: requirements.txt
  celery: polls.celery:app
environments:
  {ENV}:
    provider: local
    servers: {{web: 2, worker: 1, cache: 1, db-primary: 1, db-replica: 1}}
    lb: {{bind: 127.0.0.1, https_port: {https_port}, http_port: {http_port}}}
""")
    git = ["git", "-C", str(target), "-c", "user.email=bench@fabula.invalid", "-c", "user.name=bench"]
    subprocess.run(git + ["init", "-q", "-b", "main"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "sample app"], check=True)
    return target


class Fabula:
    def __init__(self, app: Path, state: Path):
        self.app, self.state = app, state

    def __call__(self, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fabula", *args], cwd=self.app, capture_output=True, text=True,
                              env={**os.environ, "FABULA_STATE_DIR": str(self.state)}, timeout=timeout,
                              stdin=subprocess.DEVNULL)


class Load:
    """Two clients through the load balancer; every outcome with its time."""

    def __init__(self, url: str):
        self.url, self.stop = url, threading.Event()
        self.outcomes: list[tuple[float, bool]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.session_client, daemon=True),
                        threading.Thread(target=self.db_client, daemon=True)]

    def record(self, ok: bool) -> None:
        with self.lock:
            self.outcomes.append((time.monotonic(), ok))

    def get(self, http: httpx.Client, path: str) -> None:
        try:
            self.record(http.get(self.url + path).status_code == 200)
        except httpx.HTTPError:
            self.record(False)

    def session_client(self) -> None:
        with httpx.Client(verify=False, timeout=15) as http:
            while not self.stop.is_set():
                self.get(http, "/api/session")
                time.sleep(0.01)

    def db_client(self) -> None:
        while not self.stop.is_set():
            with httpx.Client(verify=False, timeout=15) as http:
                self.get(http, "/api/entries")
            time.sleep(0.01)

    def between(self, start: float, end: float) -> tuple[int, int]:
        with self.lock:
            window = [ok for at, ok in self.outcomes if start <= at <= end]
        return sum(1 for ok in window if not ok), len(window)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


class Environment:
    def __init__(self, fabula: Fabula, project: str, https_port: int):
        self.fabula, self.project, self.https_port = fabula, project, https_port
        self.env_dir = fabula.state / project / ENV
        report = json.loads(fabula("describe", ENV, "--json").stdout)
        self.servers = {s["name"]: s for s in report["servers"]}
        self.url = f"https://127.0.0.1:{https_port}"

    def name(self, role: str) -> str:
        return next(n for n, s in sorted(self.servers.items()) if s["role"] == role)

    def supervisorctl(self, server: str, *args: str) -> str:
        root = self.env_dir / "lb" if server == "lb" else self.env_dir / "servers" / server
        return subprocess.run(["supervisorctl", "-c", str(root / "supervisor" / "supervisord.conf"), *args],
                              capture_output=True, text=True, timeout=30).stdout

    def pid(self, server: str, program: str) -> int:
        out = self.supervisorctl(server, "pid", program).strip()
        return int(out) if out.isdigit() else 0

    def in_server(self, server: str, argv: list[str]) -> bool:
        prefix = [] if server == "lb" else ["ip", "netns", "exec", f"fab.{self.project}.{ENV}.{server}"]
        return subprocess.run(prefix + argv, capture_output=True, timeout=10).returncode == 0

    def log_size(self, server: str, program: str) -> int:
        path = self.env_dir / "servers" / server / "log" / f"{program}.log"
        return path.stat().st_size if path.exists() else 0

    def logged_since(self, server: str, program: str, offset: int, text: str) -> bool:
        path = self.env_dir / "servers" / server / "log" / f"{program}.log"
        with path.open("rb") as f:
            f.seek(offset)
            return text.encode() in f.read()

    def serving(self, server: str, program: str, log_offset: int) -> bool:
        address = "127.0.0.1" if server == "lb" else self.servers[server]["address"]
        tcp = {"nginx": (address, 443), "pgbouncer": ("127.0.0.1", 6432), "redis": (address, 6379),
               "rabbitmq": (address, 5672), "haproxy": ("127.0.0.1", self.https_port)}
        if program in tcp:
            host, port = tcp[program]
            return self.in_server(server, ["bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"])
        if program == "gunicorn":
            return self.in_server(server, ["curl", "-sf", "-o", "/dev/null", "-H", "Host: healthcheck",
                                           "http://127.0.0.1:8000/healthcheck.html"])
        if program == "postgresql":
            return self.in_server(server, [PG_ISREADY, "-q", "-h", address, "-p", "5432"])
        if program == "celery":
            return self.logged_since(server, program, log_offset, " ready.")
        if program == "celerybeat":
            return self.logged_since(server, program, log_offset, "beat: Starting")
        return "RUNNING" in self.supervisorctl(server, "status", program)   # the autoscaler


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def started_at(pid: int) -> float:
    """A process's start, in CLOCK_BOOTTIME seconds (from /proc: clock ticks since boot)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / CLK_TCK


def fault(env: Environment, load: Load, server: str, program: str, deadline: float = 120,
          meanwhile=None) -> dict:
    """kill -9 of the program's process group; the time until it serves again; failed requests.
    `meanwhile` runs in a thread right after the kill."""
    old = env.pid(server, program)
    offset = env.log_size(server, program) if server != "lb" else 0
    killed_boot, killed = boottime(), time.monotonic()
    os.killpg(old, signal.SIGKILL)
    if meanwhile:
        threading.Thread(target=meanwhile, daemon=True).start()
    new, delay = 0, None
    while True:
        if time.monotonic() - killed > deadline:
            raise SystemExit(f"{server}/{program} not back within {deadline}s")
        if not new:
            pid = env.pid(server, program)
            if pid not in (0, old):
                new = pid
                try:
                    delay = started_at(new) - killed_boot
                except OSError:
                    new = 0
        if new and env.serving(server, program, offset):
            back = time.monotonic() - killed
            break
        time.sleep(0.02)
    time.sleep(2)   # requests cut by the fault, and the web server back in rotation
    failed, total = load.between(killed, time.monotonic())
    return {"killed": f"{program} on {server}", "back_s": round(back, 2),
            "restart_delay_s": round(max(delay or 0, 0), 2), "start_s": round(back - max(delay or 0, 0), 2),
            "failed": failed, "requests": total}


def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"condition not met within {timeout}s")
        time.sleep(0.2)


def web_up(env: Environment) -> bool:
    report = json.loads(env.fabula("describe", ENV, "--json").stdout)
    return all(s["lb"] == "UP" for s in report["servers"] if s["role"] == "web")


def run(base: Path, keep: bool) -> tuple[list[dict], list[str]]:
    project = f"bfaults-{secrets.token_hex(2)}"
    https = free_port()
    app = make_app(base / project, project, https, free_port())
    fabula = Fabula(app, base / "state")
    notes = []
    try:
        created = fabula("create", ENV)
        assert created.returncode == 0, created.stderr
        env = Environment(fabula, project, https)
        web1, web2 = sorted(n for n, s in env.servers.items() if s["role"] == "web")
        cache, worker = env.name("cache"), env.name("worker")
        rows = []
        with Load(env.url) as load, httpx.Client(verify=False, timeout=30) as http:
            time.sleep(2)
            for server, program in ((web1, "nginx"), (web1, "gunicorn"), (web1, "pgbouncer"),
                                    (cache, "redis"), (cache, "rabbitmq"), (env.name("db-replica"), "postgresql"),
                                    (env.name("db-primary"), "postgresql"), (worker, "pgbouncer"),
                                    (worker, "celerybeat"), ("lb", "haproxy"), ("lb", "autoscaler")):
                wait_until(lambda: web_up(env), 60)
                # a task enqueued while RabbitMQ is down: refused at once with a 503
                meanwhile = (lambda: notes.append(enqueue(env.url, "while RabbitMQ is down"))) \
                    if program == "rabbitmq" else None
                rows.append(fault(env, load, server, program, meanwhile=meanwhile))
            # a task in flight when Celery is killed runs again
            task = http.post(env.url + "/api/tasks", data={"text": "in flight", "seconds": "3"}).json()["task_id"]
            time.sleep(1.5)
            rows.append(fault(env, load, worker, "celery"))
            started = time.monotonic()
            wait_until(lambda: http.get(f"{env.url}/api/tasks/{task}").json()["done"], 120)
            notes.append(f"task in flight when Celery was killed: ran again, done {time.monotonic() - started:.1f} s "
                         "after the worker was back")
            # the whole of a web server (its supervisor too): out of rotation, not started again here
            fabula("autoscaling", ENV, "suspend", "--process", "healing")
            wait_until(lambda: web_up(env), 60)
            pids = subprocess.run(["ip", "netns", "pids", f"fab.{project}.{ENV}.{web2}"], capture_output=True,
                                  text=True).stdout.split()
            killed = time.monotonic()
            subprocess.run(["kill", "-9", *pids], check=True)
            time.sleep(8)
            failed, total = load.between(killed, time.monotonic())
            rows.append({"killed": f"every process of {web2}", "back_s": None, "restart_delay_s": None,
                         "start_s": None, "failed": failed, "requests": total})
        return rows, notes
    finally:
        if not keep:
            fabula("destroy", ENV, "--yes", timeout=600)


def enqueue(url: str, text: str) -> str:
    started = time.monotonic()
    try:
        with httpx.Client(verify=False, timeout=30) as http:
            response = http.post(url + "/api/tasks", data={"text": text})
        outcome = f"{response.status_code} {response.json().get('error', '')}".strip()
    except (httpx.HTTPError, ValueError) as exc:
        outcome = type(exc).__name__
    return f"task enqueued while RabbitMQ was down: {outcome} (after {time.monotonic() - started:.2f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the environment (destroy it yourself)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    base = Path(tempfile.mkdtemp(prefix="fabula-bench-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        rows, notes = run(base, args.keep)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps({"faults": rows, "notes": notes}, indent=2))
        return
    table = Table(title="one process killed (kill -9 of its process group) under load")
    for column in ("killed", "back after", "restart delay", "own start", "failed requests"):
        table.add_column(column, justify="left" if column == "killed" else "right")
    def seconds(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f} s"

    for r in rows:
        table.add_row(r["killed"], seconds(r["back_s"]), seconds(r["restart_delay_s"]), seconds(r["start_s"]),
                      f"{r['failed']} of {r['requests']}")
    console = Console(width=120)
    console.print(table)
    for note in notes:
        console.print(note, highlight=False)


if __name__ == "__main__":
    main()
