"""Faults under load: each service of the sample app's environment killed in turn (kill -9 of its
whole process group), one at a time, while two clients run through the load balancer (one keeps a
session, GET /api/session, over one keep-alive connection; one queries the database,
GET /api/entries, on a new connection per request). For each fault: how long until the service
serves again, how much of that was its supervisor's delay in starting it again (the rest is the
service's own start time), and the requests that failed meanwhile.

"back after" is measured from the kill to the service serving: a TCP connection accepted (nginx,
PgBouncer, Redis, RabbitMQ), HAProxy answering a request through itself (its socket holder
accepts connections while it is down; HAProxy is killed, not the holder), gunicorn answering
its health check, PostgreSQL answering pg_isready, Celery logging "ready", celery beat logging
"Starting", the autoscaler's new process running. "restart delay" is the kill to the new
process's start (its /proc start time).

Run as root: `.venv/bin/python bench/faults.py [--keep]`.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx

from fabula.sample import RequestLoad
from harness import Environment, console, remove_unless_left, require_root, table, temp_base, wait_for

ENV = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PG_ISREADY = next((p for p in ("/usr/lib/postgresql/15/bin/pg_isready", "/usr/bin/pg_isready") if Path(p).exists()),
                  "pg_isready")


class FaultEnv(Environment):
    """The environment's programs as the local provider runs them: supervisord, namespaces, logs."""

    servers: dict[str, dict]

    def load_servers(self) -> None:
        self.servers = {s["name"]: s for s in self.describe()["servers"]}

    def server_of(self, role: str) -> str:
        return next(n for n, s in sorted(self.servers.items()) if s["role"] == role)

    def supervisorctl(self, server: str, *args: str) -> str:
        root = self.env_dir / "lb" if server == "lb" else self.env_dir / "servers" / server
        return subprocess.run(["supervisorctl", "-c", str(root / "supervisor" / "supervisord.conf"), *args],
                              capture_output=True, text=True, timeout=30).stdout

    def pid(self, server: str, program: str) -> int:
        if (server, program) == ("lb", "haproxy"):  # HAProxy itself, not its socket holder
            pidfile = self.env_dir / "lb" / "haproxy.pid"
            text = pidfile.read_text().strip() if pidfile.exists() else ""
            return int(text) if text.isdigit() else 0
        out = self.supervisorctl(server, "pid", program).strip()
        return int(out) if out.isdigit() else 0

    def in_server(self, server: str, argv: list[str]) -> bool:
        prefix = [] if server == "lb" else ["ip", "netns", "exec", self.netns(server)]
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
               "rabbitmq": (address, 5672)}
        if program in tcp:
            host, port = tcp[program]
            return self.in_server(server, ["bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"])
        if program == "haproxy":  # an answer, not a connection: the socket holder accepts those
            return self.in_server(server, ["curl", "-skf", "-m", "2", "-o", "/dev/null", f"{self.url}/api/info"])
        if program == "gunicorn":
            socket = self.env_dir / "servers" / server / "run" / "gunicorn" / "gunicorn.sock"
            return self.in_server(server, ["curl", "-sf", "-o", "/dev/null", "-H", "Host: healthcheck",
                                           "--unix-socket", str(socket), "http://127.0.0.1/healthcheck.html"])
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


def fault(env: FaultEnv, load: RequestLoad, server: str, program: str, deadline: float = 120,
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


def web_up(env: FaultEnv) -> bool:
    return all(health == "UP" for health in env.web_health().values())


def run(base: Path, keep: bool) -> tuple[list[dict], list[str]]:
    env = FaultEnv.new(base, f"bfaults-{secrets.token_hex(2)}", ENV,
                       "{web: 2, worker: 1, cache: 1, db-primary: 1, db-replica: 1}")
    notes: list[str] = []
    try:
        created = env.fabula("create", ENV, timeout=1200)
        assert created.returncode == 0, created.stderr
        env.load_servers()
        web1, web2 = sorted(n for n, s in env.servers.items() if s["role"] == "web")
        cache, worker = env.server_of("cache"), env.server_of("worker")
        rows = []
        sessions_and_queries = RequestLoad(env.url, "/api/session", new_connection_path="/api/entries")
        with sessions_and_queries as load, httpx.Client(verify=False, timeout=30) as http:
            time.sleep(2)
            for server, program in ((web1, "nginx"), (web1, "gunicorn"), (web1, "pgbouncer"),
                                    (cache, "redis"), (cache, "rabbitmq"), (env.server_of("db-replica"), "postgresql"),
                                    (env.server_of("db-primary"), "postgresql"), (worker, "pgbouncer"),
                                    (worker, "celerybeat"), ("lb", "haproxy"), ("lb", "autoscaler")):
                wait_for(lambda: web_up(env), 60, message="every web server UP")
                # a task enqueued while RabbitMQ is down: refused at once with a 503
                meanwhile = (lambda: notes.append(enqueue(env.url, "while RabbitMQ is down"))) \
                    if program == "rabbitmq" else None
                rows.append(fault(env, load, server, program, meanwhile=meanwhile))
            # a task in flight when Celery is killed runs again
            task = http.post(env.url + "/api/tasks", data={"text": "in flight", "seconds": "3"}).json()["task_id"]
            time.sleep(1.5)
            rows.append(fault(env, load, worker, "celery"))
            started = time.monotonic()
            wait_for(lambda: http.get(f"{env.url}/api/tasks/{task}").json()["done"], 120, message="the task done")
            notes.append(f"task in flight when Celery was killed: ran again, done {time.monotonic() - started:.1f} s "
                         "after the worker was back")
            # the whole of a web server (its supervisor too): out of rotation, not started again here
            env.fabula("autoscaling", ENV, "suspend", "--process", "healing")
            wait_for(lambda: web_up(env), 60, message="every web server UP")
            pids = subprocess.run(["ip", "netns", "pids", env.netns(web2)], capture_output=True,
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
            env.destroy(attempts=2)


def enqueue(url: str, text: str) -> str:
    started = time.monotonic()
    try:
        with httpx.Client(verify=False, timeout=30) as http:
            response = http.post(url + "/api/tasks", data={"text": text})
        outcome = f"{response.status_code} {response.json().get('error', '')}".strip()
    except (httpx.HTTPError, ValueError) as exc:
        outcome = type(exc).__name__
    return f"task enqueued while RabbitMQ was down: {outcome} (after {time.monotonic() - started:.2f} s)"


def seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the environment (destroy it yourself)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    require_root("faults.py")
    base = temp_base("fabula-bench-")
    try:
        rows, notes = run(base, args.keep)
    finally:
        if not args.keep:
            remove_unless_left(base)
    if args.json:
        print(json.dumps({"faults": rows, "notes": notes}, indent=2))
        return
    shown = table("one process killed (kill -9 of its process group) under load",
                  ("killed", "back after", "restart delay", "own start", "failed requests"), left=("killed",))
    for r in rows:
        shown.add_row(r["killed"], seconds(r["back_s"]), seconds(r["restart_delay_s"]), seconds(r["start_s"]),
                      f"{r['failed']} of {r['requests']}")
    out = console(120)
    out.print(shown)
    for note in notes:
        out.print(note, highlight=False)


if __name__ == "__main__":
    main()
