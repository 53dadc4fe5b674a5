"""Replication lag and the cost of synchronous replication, failover write gaps, and the cost of
the web server's database link (PgBouncer over TLS vs a direct TLS connection), in real
environments of the sample app.

What it does, in one run (about 4 minutes on 2 cores). Two environments of the sample app are
created with the real CLI (`fabula.sample.make_app_repo` and `run_fabula`, in a throw-away state
directory under /var/tmp), in parallel, each `{web: 1, worker: 1, cache: 1, db-primary: 1,
db-replica: 1}`: "async" with the default asynchronous streaming replication, and "sync" with
`db: {synchronous: true}` (commits wait until the replica has flushed their WAL). Both are
destroyed at the end, also on an error or Ctrl-C, and the script checks that none of their
namespaces is left (`ip netns list`).

1. Replication lag under write load. In each environment `pgbench -i -s 4` creates pgbench's
   tables in the app's database, then the built-in TPC-B-like script (`-c 4 -j 2`) writes through
   the web server's PgBouncer: pgbench runs in web1's namespace against 127.0.0.1:6432, as the
   app does (`-n`: no vacuum before each round, so the load starts with the process). Rounds of
   10 s alternate async, sync, sync, async, async, sync, so that a trend in the machine's load
   hits both alike; each pair of consecutive rounds (one of each) gives its own sync/async ratio,
   whose spread shows how far to trust the overall one. Meanwhile one long-lived psql in the
   primary's namespace (postgres over the unix socket, one query on stdin every 100 ms; its own
   CPU and its backend's is measured and printed) samples pg_stat_replication: `replay_lag` (time
   from a WAL flush on the primary until the replica reports it replayed; NULL when the replica
   reported twice in a row that it had replayed everything, counted as 0, the count shown in
   brackets) and `pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)` (WAL bytes the replica has
   not replayed yet, including WAL still in flight). `flush lag` is the same for the replica's flush, what a
   synchronous commit waits for. Only samples taken while pgbench ran count, less its first 0.5 s
   (connecting; pg_stat_replication still shows the lag measured before); percentiles are
   nearest-rank. tps and latency are pgbench's; `sync/async` is the throughput kept with
   synchronous replication, `1 - ratio` its cost.

2. Failover, in the sync environment: a write loop through the load balancer
   (`fabula.sample.WriteLoad`: POST /api/entries about every 10 ms plus the request's time)
   runs around `fabula db promote`, first planned (the primary is healthy), then after
   `fabula db reset-replicas` rebuilt the old primary as a replica, an emergency one (every
   process of the primary's namespace from `ip netns pids` is killed with SIGKILL, then promote).
   `longest gap` is the longest time between two consecutive acknowledged (201) writes in the
   loop; `promote wall` is the CLI command's own wall time, `promote (own)` the time promote
   reports for itself (without the CLI's start-up). `PgBouncer retry wait` comes from web1's
   PgBouncer log: from its last failed server login or connect to the old primary to its first
   connection to the new one. PgBouncer waits `server_login_retry` (default 15 s) after a failed
   login before it tries that database again, even once it has been repointed, and keeps clients
   waiting meanwhile. The app's gunicorn workers, which also answer the load balancer's health
   check, then block, so HAProxy takes web1 out and answers 503 until PgBouncer connects again.
   Each acknowledged write is then looked up on the new primary; at the end both loops' writes
   are looked up on the final primary.

3. Link and PgBouncer cost. `bench/dblink.py` measures PgBouncer's native TLS against stunnel
   (one- and two-ended) and direct links on loopback, with CPU per transaction for each process.
   Here, in the real async environment, from web1's namespace: the select-only script
   (`-S -c 8 -j 2 -T 8`, persistent connections) and the same with a new connection per
   transaction (`-C`), through PgBouncer (client side plain on 127.0.0.1:6432, server side TLS
   verify-full to db1, as fabula configures it, including its logging of each client
   connection) against a direct connection to db1:5432 with sslmode=require (pg_hba and db1's
   firewall admit web servers). `pgbouncer/direct` above 1.00 means PgBouncer is faster. With
   `-C` the direct link pays a backend fork, SCRAM and a TLS handshake per transaction; through
   PgBouncer only the client side SCRAM is per connection, the TLS server connections stay
   pooled. `CPU µs/tx` is the CPU time of everything this benchmark runs (pgbench, PgBouncer,
   PostgreSQL, the environments' idle services) per transaction: where the machine is shared it
   is the steadier figure. bench/dblink.py splits it by process.

Noise. Other environments (e.g. e2e tests) may run on the machine at the same time. `other CPU`
is the machine's CPU use (in cores, from /proc/stat) during a pgbench run that was not the
processes of this benchmark's environments (their namespaces, or mentioning their directories)
nor this script and its children; above 0.3 (marked !) that run's figures are depressed.

Run as root: `.venv/bin/python bench/replication.py` (options: --help). Results:
bench/results/replication.json.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import re
import resource
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.console import Console

import harness
from fabula.sample import WriteLoad, free_port, local_keys, make_app_repo
from harness import (
    CLK_TCK,
    NOISY,
    PGBENCH,
    PGBIN,
    PSQL,
    REPO,
    RESULTS_DIR,
    BenchError,
    as_owner_of,
    console,
    environment_processes,
    field_of,
    ignore_interrupts,
    interrupt_on_signals,
    kill_namespace,
    load_average,
    log,
    machine_busy_seconds,
    proc_stat,
    remove_unless_left,
    require_root,
    save_results,
    table,
    temp_base,
    terminate_my_children,
    wait_for,
)

ENV = "repl"
SERVERS = "{web: 1, worker: 1, cache: 1, db-primary: 1, db-replica: 1}"
RESULTS = RESULTS_DIR / "replication.json"
# lag samples of a round's first half second are left out: pgbench is still connecting, and
# pg_stat_replication still shows the lag last measured before the round (stale until replaced)
WARMUP = 0.5


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without PG* variables (PGSSLMODE etc. would skew the runs), no GSS
    encryption attempt, and a connect timeout."""
    return harness.clean_env(PGGSSENCMODE="disable", PGCONNECT_TIMEOUT="10", **extra)


# --------------------------------------------------------------------------- environments


@dataclass
class Env(harness.Environment):
    """One of the two environments (async, sync) and what the run learnt about it."""

    label: str
    synchronous: bool
    create_attempted: bool = False
    create_s: float | None = None
    destroyed: bool = False

    def psql_rows(self, server: str, sql: str, database: str | None = None) -> list[str]:
        """Run SQL as postgres over a database server's unix socket, inside its namespace (as the
        environment's database user, the socket folder's owner)."""
        argv = ["ip", "netns", "exec", self.netns(server), *as_owner_of(self.socket_dir(server)), PSQL,
                "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir(server)), "-U", "postgres",
                "-d", database or self.db, "-c", sql]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=clean_env(),
                              stdin=subprocess.DEVNULL)
        if proc.returncode:
            raise BenchError(f"psql on {self.label}/{server} failed: {proc.stderr.strip()[-1000:]}")
        return [line for line in proc.stdout.splitlines() if line]


def conninfo_env(env: Env, link: str) -> dict[str, str]:
    """libpq settings from web1 to the app's database: through PgBouncer, or directly to the primary."""
    if link == "pgbouncer":
        where = dict(PGHOST="127.0.0.1", PGPORT="6432", PGSSLMODE="disable")
    else:
        where = dict(PGHOST=env.address(env.primary()), PGPORT="5432", PGSSLMODE="require")
    return clean_env(PGUSER="app", PGDATABASE=env.db, PGPASSWORD=env.app_password(), **where)


def in_web1(env: Env, argv: list[str], link: str, timeout: float) -> str:
    proc = subprocess.run(["ip", "netns", "exec", env.netns("web1"), *argv], capture_output=True, text=True,
                          timeout=timeout, env=conninfo_env(env, link), stdin=subprocess.DEVNULL)
    if proc.returncode:
        raise BenchError(f"{' '.join(argv[:3])}... on {env.label} via {link} failed (status {proc.returncode}):\n"
                         f"{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return proc.stdout


def tls_seen_by_postgres(env: Env, link: str) -> str:
    out = in_web1(env, [PSQL, "-X", "-A", "-t", "-c", "SELECT ssl, coalesce(version, ''), coalesce(cipher, '') "
                        "FROM pg_stat_ssl WHERE pid = pg_backend_pid()"], link, timeout=30).strip()
    ssl, version, cipher = out.split("|")
    return f"{version} {cipher}" if ssl == "t" else "NO TLS"


# --------------------------------------------------------------------------- CPU accounting


class CpuMeter:
    """CPU seconds used by this benchmark (its environments' processes, this script and its
    children) and by the whole machine, to tell how busy everything else was during a run."""

    def __init__(self, envs: list[Env]):
        self.envs = envs

    def snapshot(self) -> dict[str, float]:
        me = str(os.getpid())
        ticks = 0
        for proc in environment_processes([e.ns_prefix for e in self.envs],
                                          [str(e.env_dir).encode() + b"/" for e in self.envs]):
            st = proc_stat(proc.name) if proc.name != me else None
            if st:
                ticks += sum(int(v) for v in st[11:15])  # utime stime cutime cstime
        own = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
        return {"ours": ticks / CLK_TCK + own, "machine": machine_busy_seconds(), "wall": time.monotonic()}

    @staticmethod
    def other_cores(before: dict, after: dict) -> float:
        used = (after["machine"] - before["machine"]) - (after["ours"] - before["ours"])
        return max(0.0, used / (after["wall"] - before["wall"]))


# --------------------------------------------------------------------------- pgbench


def pgbench(env: Env, link: str, options: list[str], meter: CpuMeter, timeout: float) -> dict:
    before = meter.snapshot()
    out = in_web1(env, [PGBENCH, *options], link, timeout=timeout)
    after = meter.snapshot()
    n = field_of(r"number of transactions actually processed: (\d+)", out, int)
    if n == 0:
        raise BenchError(f"pgbench on {env.label} via {link} processed no transaction:\n{out}")
    return {"tps": field_of(r"tps = ([\d.]+)", out), "transactions": n,
            "failed": field_of(r"number of failed transactions: (\d+)", out, int, default=0),
            "latency_ms": field_of(r"latency average = ([\d.]+) ms", out),
            "conn_ms": field_of(r"average connection time = ([\d.]+) ms", out, default=-1.0),
            # CPU of everything this benchmark runs (pgbench, PgBouncer, PostgreSQL, both
            # environments' idle services) per transaction: less sensitive to other load than tps
            "cpu_us_per_tx": round((after["ours"] - before["ours"]) / n * 1e6, 1),
            "other_cores": round(CpuMeter.other_cores(before, after), 2)}


# --------------------------------------------------------------------------- lag sampler

LAG_SQL = ("SELECT pg_backend_pid(), count(*), "
           "max(extract(epoch FROM replay_lag)) * 1000, "
           "max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)), "
           "max(extract(epoch FROM flush_lag)) * 1000 "
           "FROM pg_stat_replication;\n")


class LagSampler(threading.Thread):
    """One psql in the primary's namespace, fed one query every `interval` seconds on stdin; an
    aggregate query, so that every query answers exactly one line even without a replica."""

    def __init__(self, env: Env, server: str, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[dict] = []
        self.error: str | None = None
        self.backend: int | None = None
        self.overhead_cores: float | None = None
        self.stop_event = threading.Event()
        argv = ["ip", "netns", "exec", env.netns(server), *as_owner_of(env.socket_dir(server)), PSQL,
                "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-h", str(env.socket_dir(server)),
                "-U", "postgres", "-d", "postgres"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1, env=clean_env())

    def run(self) -> None:
        self.started = tick = time.monotonic()
        try:
            while not self.stop_event.is_set():
                self.proc.stdin.write(LAG_SQL)
                self.proc.stdin.flush()
                line = self.proc.stdout.readline()
                if not line:
                    self.error = f"psql ended: {self.proc.stderr.read()[-500:]}"
                    return
                backend, streams, replay_ms, lag_bytes, flush_ms = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
                self.backend = int(backend)
                self.samples.append({"at": time.monotonic(), "streams": int(streams),
                                     "replay_ms": float(replay_ms) if replay_ms else None,
                                     "bytes": int(float(lag_bytes)) if lag_bytes else None,
                                     "flush_ms": float(flush_ms) if flush_ms else None})
                tick += self.interval
                self.stop_event.wait(max(0.0, tick - time.monotonic()))
        except (OSError, ValueError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def cpu_seconds(self) -> float:
        """CPU time of the sampler's psql and of the backend serving it, so far."""
        return sum(sum(int(v) for v in st[11:13]) for pid in (self.proc.pid, self.backend)
                   if pid and (st := proc_stat(pid))) / CLK_TCK

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)
        if self.samples:
            self.overhead_cores = self.cpu_seconds() / max(1e-3, time.monotonic() - self.started)
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def lag_summary(samples: list[dict]) -> dict:
    replay = [s["replay_ms"] or 0.0 for s in samples]  # NULL: caught up and idle
    flush = [s["flush_ms"] or 0.0 for s in samples]
    sizes = [s["bytes"] for s in samples if s["bytes"] is not None]
    q = lambda vs, p: None if not vs else round(percentile(vs, p), 2)  # noqa: E731
    return {"samples": len(samples), "replay_null": sum(1 for s in samples if s["replay_ms"] is None),
            "not_streaming": sum(1 for s in samples if s["streams"] == 0),
            "replay_ms": {"p50": q(replay, 50), "p99": q(replay, 99), "max": q(replay, 100)},
            "flush_ms": {"p50": q(flush, 50), "p99": q(flush, 99), "max": q(flush, 100)},
            "bytes": {"p50": q(sizes, 50), "p99": q(sizes, 99), "max": q(sizes, 100)}}


# --------------------------------------------------------------------------- the three parts


def write_load(envs: dict[str, Env], args, meter: CpuMeter) -> dict:
    order = [envs["async"], envs["sync"]]
    plan = [order[i % 2] if (i // 2) % 2 == 0 else order[1 - i % 2] for i in range(2 * args.rounds)]  # A S S A ...
    runs: dict[str, list[dict]] = {"async": [], "sync": []}
    samples: dict[str, list[dict]] = {"async": [], "sync": []}
    overhead: list[float] = []
    ordered: list[tuple[str, float]] = []
    for i, env in enumerate(plan):
        sampler = LagSampler(env, env.primary(), args.interval)
        sampler.start()
        try:
            # -n: no vacuum first (pgbench -i did it), so that the load starts with the process
            began = time.monotonic()
            result = pgbench(env, "pgbouncer", ["-n", "-c", str(args.clients), "-j", str(args.jobs), "-T",
                                                str(args.duration)], meter, timeout=args.duration + 120)
            ended = time.monotonic()
        finally:
            sampler.stop()
        if sampler.error:
            raise BenchError(f"lag sampler on {env.label}: {sampler.error}")
        overhead.append(sampler.overhead_cores)
        window = [{"round": len(runs[env.label]), "t": round(s["at"] - began, 3),
                   **{k: v for k, v in s.items() if k != "at"}}
                  for s in sampler.samples if began + WARMUP <= s["at"] <= ended]
        samples[env.label] += window
        result["lag"] = lag_summary(window)
        runs[env.label].append(result)
        ordered.append((env.label, result["tps"]))
        log(f"  write round {i + 1}/{len(plan)} {env.label:5}: {result['tps']:8.1f} tps, replay lag p99 "
            f"{result['lag']['replay_ms']['p99']} ms, other CPU {result['other_cores']:.2f}")
    out = {}
    for label, rs in runs.items():
        tx = sum(r["transactions"] for r in rs)
        out[label] = {"tps": round(sum(r["tps"] for r in rs) / len(rs), 1),
                      "tps_rounds": [round(r["tps"], 1) for r in rs],
                      "latency_ms": round(sum(r["latency_ms"] * r["transactions"] for r in rs) / tx, 3),
                      "transactions": tx, "failed": sum(r["failed"] for r in rs),
                      "other_cores": round(max(r["other_cores"] for r in rs), 2),
                      "lag": lag_summary(samples[label]), "rounds": rs, "samples": samples[label]}
    out["sync_over_async_tps"] = round(out["sync"]["tps"] / out["async"]["tps"], 3)
    # each pair of consecutive rounds has one of each mode: its ratio shows how noisy the mean one is
    pairs = [dict(ordered[i:i + 2]) for i in range(0, len(ordered) - 1, 2)]
    out["sync_over_async_per_pair"] = [round(p["sync"] / p["async"], 3) for p in pairs]
    out["sampler_overhead_cores"] = round(max(o for o in overhead if o is not None), 4)
    return out


def link_cost(env: Env, args, meter: CpuMeter) -> dict:
    tls = {link: tls_seen_by_postgres(env, link) for link in ("pgbouncer", "direct")}
    common = ["-n", "-S", "-c", str(args.link_clients), "-j", str(args.jobs), "-T", str(args.link_duration)]
    results: dict[str, dict] = {}
    # pgbouncer, direct, direct, pgbouncer: a drift in the machine's load hits both alike
    for mode, link in (("persistent", "pgbouncer"), ("persistent", "direct"),
                       ("new_conn", "direct"), ("new_conn", "pgbouncer")):
        opts = common + (["-C"] if mode == "new_conn" else [])
        r = pgbench(env, link, opts, meter, timeout=args.link_duration + 120)
        results.setdefault(mode, {})[link] = r
        log(f"  select-only {mode:10} {link:9}: {r['tps']:9.1f} tps, other CPU {r['other_cores']:.2f}")
    for mode in results:
        results[mode]["pgbouncer_over_direct"] = round(results[mode]["pgbouncer"]["tps"] /
                                                       results[mode]["direct"]["tps"], 3)
    return {"tls_at_postgres": tls, **results}


def acknowledged_present(env: Env, server: str, loads: list[WriteLoad]) -> tuple[int, int]:
    texts = {text for load in loads for _, text in load.acknowledged}
    patterns = " OR ".join(f"text LIKE 'load-{load.run_id}-%'" for load in loads)
    found = set(env.psql_rows(server, f"SELECT text FROM notes_entry WHERE {patterns}"))
    return len(texts), len(texts & found)


PGB_EVENT = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC .*@([\d.]+):5432 "
                       r"(closing because: (?:login|connect) failed|new connection to server)")


def pgbouncer_retry(env: Env, since: float, old_address: str, new_address: str) -> dict:
    """From web1's PgBouncer log: its last failed server login/connect to the old primary, and how
    long after it PgBouncer first connected to the new one (PgBouncer waits server_login_retry,
    15 s by default, after a failed login before it tries the database again, repointed or not)."""
    log_file = env.log_file("web1", "pgbouncer.log")
    failed = None
    for line in log_file.read_text(errors="replace").splitlines():
        m = PGB_EVENT.match(line)
        if not m:
            continue
        at = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC).timestamp()
        if at < since:
            continue
        if "failed" in m[3] and m[2] == old_address:
            failed = (at, m[3].removeprefix("closing because: "))
        elif "new connection" in m[3] and m[2] == new_address:
            return {"failed": failed[1] if failed else None,
                    "failed_to_new_connection_s": round(at - failed[0], 2) if failed else None,
                    "new_connection_after_event_s": round(at - since, 2)}
    return {"failed": failed[1] if failed else None, "failed_to_new_connection_s": None,
            "new_connection_after_event_s": None}


def failover(env: Env, kind: str) -> tuple[dict, WriteLoad]:
    old = env.primary()
    old_address = env.address(old)
    load = WriteLoad(env.url, max_seconds=240)
    load.start()
    killed_pids = 0
    try:
        started = time.monotonic()
        wait_for(lambda: len(load.acknowledged) >= 20 and time.monotonic() - started > 2, timeout=60,
                 message=f"writes acknowledged before the {kind} promote")
        event, event_wall = time.monotonic(), time.time()  # the primary is stopped (by promote) or killed
        if kind == "emergency":
            killed_pids = kill_namespace(env.netns(old))
        promote_started = time.monotonic()
        promoted = env.fabula("db", "promote", ENV, timeout=300)
        promote_done = time.monotonic()
        if promoted.returncode:
            raise BenchError(f"{kind} promote failed (rc {promoted.returncode}):\n{promoted.stderr[-3000:]}")
        wait_for(lambda: load.acknowledged_since(promote_done) >= 20, timeout=60,
                 message=f"writes acknowledged after the {kind} promote")
    finally:
        load.stop()
    reported = re.search(r"\((planned|emergency), ([\d.]+)s\)", promoted.stdout + promoted.stderr)
    if not reported or reported.group(1) != kind:
        raise BenchError(f"promote did not report a {kind} failover:\n{promoted.stderr[-2000:]}")
    times = [at for at, _ in load.acknowledged]
    gaps = [(b - a, a) for a, b in zip(times, times[1:], strict=False)]
    gap, gap_start = max(gaps)
    new = env.primary()
    acked, present = acknowledged_present(env, new, [load])
    pgb = pgbouncer_retry(env, event_wall, old_address, env.address(new))
    first_after = next((at for at in times if at > event), None)
    return {"kind": kind, "old_primary": old, "new_primary": new, "killed_pids": killed_pids,
            "longest_gap_s": round(gap, 3), "gap_starts_after_event_s": round(gap_start - event, 3),
            "first_write_after_event_s": round(first_after - event, 3) if first_after else None,
            "promote_wall_s": round(promote_done - promote_started, 2), "promote_own_s": float(reported.group(2)),
            "acknowledged": acked, "present_on_new_primary": present, "failed_requests": len(load.failures),
            "failure_kinds": dict(Counter(f for _, f in load.failures)), "pgbouncer": pgb,
            "load_seconds": round(times[-1] - times[0], 1)}, load


def failovers(env: Env, out: dict) -> None:
    """Fills `out` as it goes, so that a failure keeps what was measured before it."""
    planned, planned_load = failover(env, "planned")
    out["planned"] = planned
    log(f"  planned promote: gap {planned['longest_gap_s']} s, {planned['present_on_new_primary']}/"
        f"{planned['acknowledged']} acknowledged writes on {planned['new_primary']}")
    started = time.monotonic()
    reset = env.fabula("db", "reset-replicas", ENV, timeout=600)
    reset_s = round(time.monotonic() - started, 1)
    if reset.returncode:
        raise BenchError(f"reset-replicas failed (rc {reset.returncode}):\n{reset.stderr[-3000:]}")
    streaming = env.psql_rows(env.primary(), "SELECT application_name || ':' || state || ':' || sync_state "
                                             "FROM pg_stat_replication", database="postgres")
    log(f"  reset-replicas: {reset_s} s, replication {streaming}")
    out.update(reset_replicas_s=reset_s, replication_after_reset=streaming)
    emergency, emergency_load = failover(env, "emergency")
    out["emergency"] = emergency
    log(f"  emergency promote: gap {emergency['longest_gap_s']} s, {emergency['present_on_new_primary']}/"
        f"{emergency['acknowledged']} acknowledged writes on {emergency['new_primary']}")
    final = env.primary()
    acked, present = acknowledged_present(env, final, [planned_load, emergency_load])
    out.update(final_primary=final, both_loads_acknowledged=acked, both_loads_present_on_final_primary=present)


# --------------------------------------------------------------------------- setup and cleanup


def create_all(envs: list[Env]) -> None:
    errors: dict[str, str] = {}

    def create(env: Env) -> None:
        started = time.monotonic()
        try:
            result = env.fabula("create", ENV, timeout=900)
        except subprocess.TimeoutExpired:
            errors[env.label] = "timed out after 900 s"
            return
        env.create_s = round(time.monotonic() - started, 1)
        if result.returncode:
            errors[env.label] = f"rc {result.returncode}:\n{result.stderr[-3000:]}"

    threads = []
    for env in envs:
        env.create_attempted = True
        threads.append(threading.Thread(target=create, args=(env,), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join()
    if errors:
        raise BenchError("; ".join(f"create {label}: {e}" for label, e in errors.items()))


def destroy(env: Env) -> str | None:
    """Destroy one environment (a second attempt if the first fails); an error message, or None."""
    if env.destroyed or not env.create_attempted:
        return None
    started = time.monotonic()
    problem = env.destroy(attempts=2)
    env.destroyed = problem is None
    log(f"destroyed {env.label} ({env.project}) in {time.monotonic() - started:.1f} s" +
        (f" -- PROBLEM: {problem}" if problem else ""))
    return problem


# --------------------------------------------------------------------------- report


def fmt3(d: dict, digits: int = 1, scale: float = 1.0) -> str:
    return " / ".join("-" if d[k] is None else f"{d[k] * scale:,.{digits}f}" for k in ("p50", "p99", "max"))


def retry_cell(pgb: dict) -> str:
    if pgb["failed_to_new_connection_s"] is None:
        return "- (no failed login)" if pgb["failed"] is None else f"? ({pgb['failed']})"
    return f"{pgb['failed_to_new_connection_s']:.2f} ({pgb['failed']})"


def report(out: Console, results: dict, args) -> None:
    wl = results.get("write_load")
    if wl:
        t = table(f"1. Replication under pgbench TPC-B-like writes through PgBouncer (scale {args.scale}, "
                  f"-c {args.clients} -j {args.jobs}, {args.rounds} x {args.duration} s per mode, "
                  f"lag sampled every {args.interval * 1000:.0f} ms on the primary)",
                  ("replication", "tps", "tps per round", "lat ms", "replay lag ms p50/p99/max",
                   "lag KiB p50/p99/max", "flush lag ms p50/p99", "samples (null)", "other CPU max"),
                  left=("replication",), title_justify="left")
        for label in ("async", "sync"):
            r, lag = wl[label], wl[label]["lag"]
            t.add_row(label, f"{r['tps']:,.1f}", " / ".join(f"{v:,.0f}" for v in r["tps_rounds"]),
                      f"{r['latency_ms']:.2f}", fmt3(lag["replay_ms"]), fmt3(lag["bytes"], 1, 1 / 1024),
                      " / ".join(fmt3(lag["flush_ms"]).split(" / ")[:2]),
                      f"{lag['samples']} ({lag['replay_null']})",
                      f"{r['other_cores']:.2f}" + (" !" if r["other_cores"] > NOISY else ""))
        out.print(t)
        ratio = wl["sync_over_async_tps"]
        out.print(f"sync/async tps: {ratio:.2f}x -> synchronous replication costs {1 - ratio:.0%} of the "
                      f"write throughput here (latency {wl['sync']['latency_ms']:.2f} vs "
                      f"{wl['async']['latency_ms']:.2f} ms per transaction); per pair of consecutive rounds: "
                      + ", ".join(f"{r:.2f}" for r in wl["sync_over_async_per_pair"])
                      + f". Sampler's own CPU (psql + its backend): {wl['sampler_overhead_cores'] * 100:.2f}% "
                        "of a core at most")
    fo = results.get("failover")
    if fo:
        t = table("2. Failover under a write loop through the load balancer (sync environment)",
                  ("promote", "servers", "longest write gap s", "gap starts at s", "promote wall s",
                   "promote (own) s", "PgBouncer retry wait s", "acked writes", "on new primary",
                   "failed requests"), left=("promote", "servers"), title_justify="left")
        for kind in ("planned", "emergency"):
            r = fo.get(kind)
            if not r:
                continue
            how = f"{r['old_primary']} -> {r['new_primary']}" + (f" ({r['killed_pids']} pids killed)"
                                                                    if kind == "emergency" else "")
            t.add_row(kind, how, f"{r['longest_gap_s']:.2f}", f"{r['gap_starts_after_event_s']:+.2f}",
                      f"{r['promote_wall_s']:.2f}", f"{r['promote_own_s']:.1f}", retry_cell(r["pgbouncer"]),
                      str(r["acknowledged"]), str(r["present_on_new_primary"]),
                      f"{r['failed_requests']} ("
                      + ", ".join(f"{k.replace('HTTP ', '')}: {v}" for k, v in r["failure_kinds"].items()) + ")")
        out.print(t)
        out.print("gap starts at: seconds after the promote command started (planned) or after the kill -9 "
                      "(emergency); negative = the last write before the gap was acknowledged earlier. PgBouncer "
                      "retry wait: in web1's PgBouncer log, from its last failed server login/connect to the old "
                      "primary to its first connection to the new one (server_login_retry, 15 s by default; "
                      "clients wait meanwhile, so gunicorn's workers, which also answer the load balancer's "
                      "health check, block: HAProxy takes web1 out and answers 503)")
        if "reset_replicas_s" in fo:
            out.print(f"reset-replicas between the two: {fo['reset_replicas_s']:.1f} s "
                          f"(then {', '.join(fo['replication_after_reset'])})")
        if "both_loads_present_on_final_primary" in fo:
            out.print(f"acknowledged writes of both loops on the final primary {fo['final_primary']}: "
                          f"{fo['both_loads_present_on_final_primary']}/{fo['both_loads_acknowledged']}")
    lk = results.get("link")
    if lk:
        t = table(f"3. Select-only pgbench from web1 (-S -c {args.link_clients} -j {args.jobs} "
                  f"-T {args.link_duration}, async environment): PgBouncer (TLS to db1) vs direct "
                  f"(sslmode=require)",
                  ("connections", "pgbouncer tps", "direct tps", "pgbouncer/direct", "lat ms pgb / direct",
                   "conn ms pgb / direct", "CPU µs/tx pgb / direct", "other CPU pgb / direct"),
                  left=("connections",), title_justify="left")
        for mode, label in (("persistent", "persistent (-S)"), ("new_conn", "new per tx (-S -C)")):
            p, d = lk[mode]["pgbouncer"], lk[mode]["direct"]
            conn = "-" if mode == "persistent" else f"{p['conn_ms']:.2f} / {d['conn_ms']:.2f}"
            flag = lambda v: f"{v:.2f}" + (" !" if v > NOISY else "")  # noqa: E731
            t.add_row(label, f"{p['tps']:,.0f}", f"{d['tps']:,.0f}", f"{lk[mode]['pgbouncer_over_direct']:.2f}x",
                      f"{p['latency_ms']:.3f} / {d['latency_ms']:.3f}", conn,
                      f"{p['cpu_us_per_tx']:,.0f} / {d['cpu_us_per_tx']:,.0f}",
                      f"{flag(p['other_cores'])} / {flag(d['other_cores'])}")
        out.print(t)
        out.print(f"TLS as PostgreSQL sees it: via PgBouncer {lk['tls_at_postgres']['pgbouncer']}; "
                      f"direct {lk['tls_at_postgres']['direct']}. Loopback-only PgBouncer vs stunnel vs direct, "
                      "with CPU per transaction: bench/dblink.py")
    meta = results["meta"]
    if wl or lk:
        out.print(f"lag samples: every {args.interval * 1000:.0f} ms while pgbench ran, less its first "
                      f"{WARMUP} s; NULL replay_lag (replica fully caught up) counted as 0. Figures marked ! ran "
                      f"while other processes used more than {NOISY} cores of the machine.")
    out.print(f"creates (parallel): {meta.get('create_s')}; load average before {meta['load_before']}, "
                  f"after {meta.get('load_after')}; {meta['machine']}; total {meta.get('total_s')} s")


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per write-load round (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="write-load rounds per mode (default 3)")
    parser.add_argument("--clients", type=int, default=4, help="pgbench -c for the write load (default 4)")
    parser.add_argument("--jobs", type=int, default=2, help="pgbench -j (default 2)")
    parser.add_argument("--scale", type=int, default=4, help="pgbench -i -s (default 4: one branch per client)")
    parser.add_argument("--interval", type=float, default=0.1, help="lag sampling interval, s (default 0.1)")
    parser.add_argument("--link-duration", type=int, default=8, help="seconds per select-only run (default 8)")
    parser.add_argument("--link-clients", type=int, default=8, help="pgbench -c for select-only (default 8)")
    args = parser.parse_args()
    require_root("replication.py")
    out = console(170)
    interrupt_on_signals()
    started = time.monotonic()
    base = temp_base("fabula-repl-bench-")
    tag = secrets.token_hex(2)
    envs = {label: Env(project=f"repl{label[0]}-{tag}", name=ENV, app_dir=base / f"app-{label}",
                       state_dir=base / "state", https_port=free_port(), http_port=free_port(), label=label,
                       synchronous=label == "sync") for label in ("async", "sync")}
    meter = CpuMeter(list(envs.values()))
    results: dict = {"config": {k: getattr(args, k) for k in vars(args)} | {"servers": SERVERS},
                     "meta": {"load_before": load_average(),
                              "machine": f"Linux {platform.release()}, {os.cpu_count()} CPUs, "
                                         + subprocess.run([str(PGBIN / "postgres"), "--version"], capture_output=True,
                                                          text=True).stdout.strip()}}
    status = 0
    try:
        for env in envs.values():
            make_app_repo(env.app_dir, env.project, ENV, local_keys(env.https_port, env.http_port)
                          + ("    db: {synchronous: true}\n" if env.synchronous else ""), servers=SERVERS)
        log(f"creating {', '.join(f'{e.label} ({e.project})' for e in envs.values())} in parallel under {base}")
        create_all(list(envs.values()))
        results["meta"]["create_s"] = {e.label: e.create_s for e in envs.values()}
        log(f"created: {results['meta']['create_s']}")
        for env in envs.values():
            t0 = time.monotonic()
            in_web1(env, [PGBENCH, "-i", "-q", "-s", str(args.scale)], "pgbouncer", timeout=600)
            log(f"pgbench -i -s {args.scale} in {env.label}: {time.monotonic() - t0:.1f} s")
        sync_rows = envs["sync"].psql_rows("db1", "SELECT application_name || ':' || sync_state FROM "
                                                  "pg_stat_replication", database="postgres")
        async_rows = envs["async"].psql_rows("db1", "SELECT application_name || ':' || sync_state FROM "
                                                    "pg_stat_replication", database="postgres")
        results["meta"]["replication"] = {"async": async_rows, "sync": sync_rows}
        if sync_rows != ["db2:sync"] or async_rows != ["db2:async"]:
            raise BenchError(f"unexpected replication state: async {async_rows}, sync {sync_rows}")
        log("write load with lag sampling")
        results["write_load"] = write_load(envs, args, meter)
        log("select-only link cost in the async environment")
        results["link"] = link_cost(envs["async"], args, meter)
        destroy(envs["async"])  # before the failovers, so that they have the machine to themselves
        log("failovers in the sync environment")
        results["failover"] = {}
        failovers(envs["sync"], results["failover"])
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        status = 130
    except (BenchError, AssertionError, subprocess.SubprocessError, OSError, KeyError, ValueError) as exc:
        print(f"\nbench/replication.py failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 1
    finally:
        ignore_interrupts()  # a second Ctrl-C must not interrupt the cleanup
        terminate_my_children()  # e.g. a create or pgbench still running after an interrupt
        time.sleep(0.5 if status else 0)
        problems = [f"{e.label}: {p}" for e in envs.values() if (p := destroy(e))]
        left = remove_unless_left(base, envs.values())
        results["meta"]["cleanup"] = {"destroy_problems": problems, "leftovers": left,
                                      "temp_dir_removed": not base.exists()}
        log(f"cleanup: {'LEFT: ' + ', '.join(left) if left else 'no namespace or process of ours left'} "
            f"(ip netns list, /proc); {base} {'NOT removed' if base.exists() else 'removed'}")
        if problems or left:
            status = status or 1
    results["meta"]["load_after"] = load_average()
    results["meta"]["total_s"] = round(time.monotonic() - started)
    report(out, results, args)
    if status == 0:
        out.print(f"results: {save_results('replication', results).relative_to(REPO)}")
    else:  # an incomplete run does not replace the last complete one
        out.print(f"INCOMPLETE (exit status {status}): {RESULTS.name} not written")
    return status


if __name__ == "__main__":
    sys.exit(main())
