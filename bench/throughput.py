"""Requests per second of the sample app through fabula's stack, as two ratios measured side by
side in one run, with wrk (keep-alive connections):

1. a small JSON view (`/api/info`) through the load balancer, 2 web servers behind it (HAProxy's
   TLS, then each server's nginx TLS, then gunicorn on its Unix socket) ÷ the same view from one
   web server's gunicorn directly: a copy of it (same release, user, settings, workers and
   PgBouncer) on 127.0.0.1:8002 in the server's namespace, wrk there too;
2. a view doing one query (`GET /api/entries`: a count) with Django's default CONN_MAX_AGE = 0, so a
   new database connection per request: through the web server's PgBouncer (as fabula runs the
   app: its Unix socket, peer authentication; the copy on 8002) ÷ straight to PostgreSQL over TLS
   (SCRAM): a second copy on 127.0.0.1:8001 with DATABASE_URL set to the primary's port 5432
   (sslmode=require); both are loaded from inside the web server's namespace, in alternating rounds.

Run as root: `.venv/bin/python bench/throughput.py [--duration 10] [--connections 16] [--rounds 2]`.
"""
from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from rich.console import Console

from harness import (
    BenchError,
    Environment,
    interrupt_on_signals,
    load_average,
    proc_stat,
    remove_unless_left,
    require_root,
    save_results,
    table,
    temp_base,
    wait_for,
)

ENV = "bench"
COPY_PORT = 8002      # the server's own gunicorn listens on a Unix socket (for nginx), which wrk cannot load
DIRECT_PORT = 8001
# what Django wants of a request that did not come through nginx (ALLOWED_HOSTS, the proxy's TLS header)
HEADERS = ["-H", "Host: 127.0.0.1", "-H", "X-Forwarded-Proto: https"]


def wrk(url: str, seconds: int, connections: int, netns: str | None = None, headers: list[str] = ()) -> dict:
    """wrk's requests/s and the requests that were not 2xx/3xx or failed."""
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", *headers, url]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise BenchError(f"wrk printed no figure:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": float(rps.group(1)), "bad": int(bad.group(1)) if bad else 0,
            "socket_errors": sum(map(int, errors.groups())) if errors else 0}


def cpu_by_program() -> dict[str, float]:
    """CPU seconds (user + system) of every process on the machine, summed by program name
    (supervisord and other Python programs by their script: `python3 gunicorn` counts as gunicorn)."""
    tick = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            stat = proc_stat(proc.name)
            if stat is None:
                continue
            if comm.startswith("kworker"):   # named after its current work, which changes
                comm = "kworker (the kernel's)"
            elif comm.startswith("python"):
                line = (proc / "cmdline").read_bytes()
                comm = next((n for n in ("supervisord", "gunicorn", "celery", "fabula") if n.encode() in line), comm)
        except OSError:
            continue
        totals[comm] = totals.get(comm, 0.0) + (int(stat[11]) + int(stat[12])) / tick
    mine = os.times()   # wrk, once it has exited, counts as this script's child
    totals["wrk"] = mine.children_user + mine.children_system
    return totals


def cpu_during(run: Callable[[], dict]) -> dict:
    """`run()`'s result, with the CPU seconds each program used meanwhile (`cpu`)."""
    before = cpu_by_program()
    result = run()
    after = cpu_by_program()
    result["cpu"] = {k: round(v - before.get(k, 0.0), 2) for k, v in after.items() if v - before.get(k, 0.0) >= 0.05}
    return result


def gunicorn_master(env: Environment, server: str) -> int:
    """The pid of the server's gunicorn master (the gunicorn process whose parent is not one)."""
    root = str(env.env_dir / "servers" / server).encode()
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
            stat = proc_stat(proc.name) if b"gunicorn" in cmdline and root in cmdline and b"--bind" in cmdline else None
            if stat is not None and b"gunicorn" not in Path(f"/proc/{stat[1]}/cmdline").read_bytes():
                return int(proc.name)
        except OSError:
            continue
    raise BenchError(f"no gunicorn master of {server} found")


def start_copy(env: Environment, server: str, master: int, port: int, direct: bool) -> subprocess.Popen:
    """The server's gunicorn (its master's pid) again, on 127.0.0.1:`port`; with `direct`, its
    DATABASE_URL the primary's PostgreSQL instead of the server's PgBouncer."""
    proc = Path("/proc") / str(master)
    argv = (proc / "cmdline").read_bytes().decode().split("\0")[:-1]
    argv[argv.index("--bind") + 1] = f"127.0.0.1:{port}"
    variables = dict(line.split("=", 1) for line in (proc / "environ").read_bytes().decode().split("\0") if "=" in line)
    # the server's own: PgBouncer's Unix socket in the server's run/pgbouncer, as the app's OS user
    socket_dir = quote(str(env.env_dir / "servers" / server / "run" / "pgbouncer"), safe="")
    if f"@{socket_dir}:6432/" not in variables.get("DATABASE_URL", ""):
        raise BenchError("the server's gunicorn has no DATABASE_URL of its PgBouncer's socket")
    if direct:
        variables["DATABASE_URL"] = (f"postgres://app:{env.app_password()}@{env.address(env.primary())}:5432/"
                                     f"{env.db}?sslmode=require")
    status = (proc / "status").read_text()
    uid = re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)   # type: ignore[union-attr]
    gid = re.search(r"^Gid:\s+(\d+)", status, re.M).group(1)   # type: ignore[union-attr]
    command = ["ip", "netns", "exec", env.netns(server), "setpriv", f"--reuid={uid}", f"--regid={gid}",
               "--clear-groups", "--", *argv]
    copy = subprocess.Popen(command, env=variables, cwd=os.readlink(proc / "cwd"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)

    def serving() -> bool:
        if copy.poll() is not None:
            raise BenchError(f"the gunicorn on {port} exited: {copy.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        probe = subprocess.run(["ip", "netns", "exec", env.netns(server), "curl", "-s", "-o", "/dev/null",
                                "-w", "%{http_code}", *HEADERS, f"http://127.0.0.1:{port}/api/entries"],
                               capture_output=True, text=True)
        return probe.stdout == "200"
    wait_for(serving, timeout=60, message=f"the gunicorn on {port} serving /api/entries")
    return copy


def stop(copy: subprocess.Popen) -> None:
    try:
        os.killpg(copy.pid, signal.SIGTERM)
        copy.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(copy.pid, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per comparison")
    args = parser.parse_args()
    require_root("throughput.py")
    interrupt_on_signals()
    if subprocess.run(["sh", "-c", "command -v wrk"], capture_output=True).returncode:
        print("error: wrk is missing\n  fix: run `make setup` (it installs Debian's wrk)", file=sys.stderr)
        return 2
    console = Console()
    base = temp_base("fabula-bench-throughput-")
    env = Environment.new(base, f"bthru-{secrets.token_hex(2)}", ENV,
                          servers="{web: 2, worker: 1, cache: 1, db-primary: 1, db-replica: 0}")
    copies: list[subprocess.Popen] = []
    try:
        created = env.fabula("create", ENV, timeout=1200)
        if created.returncode:
            raise BenchError(f"create failed (rc {created.returncode}):\n{created.stderr[-3000:]}")
        web = env.netns("web1")
        master = gunicorn_master(env, "web1")
        for port, direct in ((COPY_PORT, False), (DIRECT_PORT, True)):
            copies.append(start_copy(env, "web1", master, port, direct))
        d, c = args.duration, args.connections
        copy_url = f"http://127.0.0.1:{COPY_PORT}"
        runs: dict[str, list[dict]] = {"lb": [], "gunicorn": [], "pgbouncer": [], "postgresql": []}
        for _ in range(args.rounds):   # alternating, so that drift in the machine's load hits both sides
            runs["lb"].append(cpu_during(lambda: wrk(f"{env.url}/api/info", d, c)))
            runs["gunicorn"].append(cpu_during(lambda: wrk(f"{copy_url}/api/info", d, c, web, HEADERS)))
            runs["pgbouncer"].append(wrk(f"{copy_url}/api/entries", d, c, web, HEADERS))
            runs["postgresql"].append(wrk(f"http://127.0.0.1:{DIRECT_PORT}/api/entries", d, c, web, HEADERS))
        mean = {k: sum(r["rps"] for r in v) / len(v) for k, v in runs.items()}
        failed = {k: sum(r["bad"] + r["socket_errors"] for r in v) for k, v in runs.items()}
        rows = table(f"requests/s, wrk -t2 -c{c} -d{d}s, {args.rounds} alternating rounds (load {load_average()})",
                     ["path", "requests/s", "each round", "failed", "ratio"], left=["path"])
        rows.add_row("/api/info through the load balancer (2 web servers)", f"{mean['lb']:.0f}",
                     " ".join(f"{r['rps']:.0f}" for r in runs["lb"]), str(failed["lb"]),
                     f"{mean['lb'] / mean['gunicorn']:.2f}")
        rows.add_row("/api/info from web1's gunicorn directly", f"{mean['gunicorn']:.0f}",
                     " ".join(f"{r['rps']:.0f}" for r in runs["gunicorn"]), str(failed["gunicorn"]), "1")
        rows.add_row("/api/entries (a query, CONN_MAX_AGE=0) through PgBouncer", f"{mean['pgbouncer']:.0f}",
                     " ".join(f"{r['rps']:.0f}" for r in runs["pgbouncer"]), str(failed["pgbouncer"]),
                     f"{mean['pgbouncer'] / mean['postgresql']:.2f}")
        rows.add_row("/api/entries straight to PostgreSQL over TLS", f"{mean['postgresql']:.0f}",
                     " ".join(f"{r['rps']:.0f}" for r in runs["postgresql"]), str(failed["postgresql"]), "1")
        console.print(rows)
        # where the CPU goes: microseconds of each program per request served, both paths
        cpu = table("CPU per request (µs), summed over the rounds", ["program", "through the load balancer",
                                                                   "gunicorn directly"], left=["program"])
        served = {k: sum(r["rps"] * d for r in runs[k]) for k in ("lb", "gunicorn")}
        used = {k: {} for k in served}
        for k in served:
            for r in runs[k]:
                for name, seconds in r["cpu"].items():
                    used[k][name] = used[k].get(name, 0.0) + seconds
        for name in sorted(set(used["lb"]) | set(used["gunicorn"]), key=lambda n: -used["lb"].get(n, 0.0)):
            cpu.add_row(name, *(f"{1e6 * used[k].get(name, 0.0) / served[k]:.0f}" for k in ("lb", "gunicorn")))
        cpu.add_row("all", *(f"{1e6 * sum(used[k].values()) / served[k]:.0f}" for k in ("lb", "gunicorn")))
        console.print(cpu)
        console.print(f"load balancer ÷ gunicorn: {mean['lb'] / mean['gunicorn']:.2f} (goal ≥ 0.85); "
                      f"PgBouncer ÷ PostgreSQL: {mean['pgbouncer'] / mean['postgresql']:.2f} (goal ≥ 3)")
        save_results("throughput", {"runs": runs, "mean": mean, "failed": failed,
                                    "lb_ratio": mean["lb"] / mean["gunicorn"],
                                    "pgbouncer_ratio": mean["pgbouncer"] / mean["postgresql"],
                                    "duration": d, "connections": c, "when": time.time()})
        return 0
    finally:
        for copy in copies:
            stop(copy)
        problem = env.destroy(attempts=2)
        left = remove_unless_left(base, [env])
        if problem or left:
            console.print(f"[red]cleanup: {problem or ''} {' '.join(left)}[/red]")


if __name__ == "__main__":
    sys.exit(main())
