"""`fabula db status`: each database server's role, timeline and WAL position, and for each
replica its state, lag in bytes and in time, and whether commits wait for it."""
from __future__ import annotations

import time

from fabula.context import Context
from fabula.errors import FabulaError
from fabula.roles import postgres

HEARTBEAT_TIMEOUT = 5.0


def query(ctx: Context, name: str, sql: str) -> list[list[str]] | None:
    """Rows of a query run on a database server as postgres; None when it does not answer (nor
    does its host)."""
    host = ctx.host(name)
    if not ctx.provider.server_exists(name):
        return None
    try:
        result = host.run([str(postgres.PG_BIN / "psql"), "-X", "-q", "-A", "-t", "-F", "\t", "-h",
                           str(postgres.socket_dir(host)), "-U", "postgres", "-d", "postgres", "-c", sql],
                          user=host.accounts.db, timeout=10)
    except FabulaError:   # the host is down or cut off (ssh)
        return None
    if not result.ok:
        return None
    return [line.split("\t") for line in result.stdout.splitlines() if line]


def server_status(ctx: Context, name: str) -> dict:
    record = ctx.state.servers[name]
    report = {"name": name, "role": record.role, "address": record.address, "rebuild": record.rebuild}
    # the checkpoint's timeline lags behind a promotion until the next checkpoint: a primary's
    # current WAL file name and a replica's receiver say the timeline now
    rows = query(ctx, name, "SELECT pg_is_in_recovery(), COALESCE(CASE WHEN pg_is_in_recovery() "
                            "THEN (SELECT received_tli FROM pg_stat_wal_receiver) "
                            "ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, "
                            "(SELECT timeline_id FROM pg_control_checkpoint())), "
                            "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
                            "ELSE pg_current_wal_lsn() END")
    if not rows:
        report.update(up=False)
        return report
    in_recovery, timeline, lsn = rows[0]
    report.update(up=True, in_recovery=in_recovery == "t", timeline=int(timeline), wal_lsn=lsn)
    return report


def replication(ctx: Context, primary: str) -> list[dict]:
    rows = query(ctx, primary, "SELECT application_name, state, sync_state, "
                               "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint, "
                               "COALESCE(EXTRACT(epoch FROM replay_lag), 0) FROM pg_stat_replication")
    return [{"name": r[0], "state": r[1], "sync_state": r[2], "lag_bytes": int(r[3] or 0),
             "replay_lag_s": float(r[4] or 0)} for r in rows or []]


def measure_lag(ctx: Context, primary: str, replicas: list[str]) -> dict[str, float | None]:
    """Write a heartbeat row on the primary and time how long each replica takes to show it."""
    stamp = f"{time.time():.6f}"
    written = query(ctx, primary, "CREATE TABLE IF NOT EXISTS fabula_heartbeat (id int PRIMARY KEY, stamp text); "
                                  f"INSERT INTO fabula_heartbeat VALUES (1, '{stamp}') "
                                  "ON CONFLICT (id) DO UPDATE SET stamp = excluded.stamp RETURNING 1")
    if written is None:
        return {r: None for r in replicas}
    started = time.monotonic()
    lag: dict[str, float | None] = {}
    pending = set(replicas)
    while pending and time.monotonic() - started < HEARTBEAT_TIMEOUT:
        for name in sorted(pending):
            rows = query(ctx, name, "SELECT stamp FROM fabula_heartbeat WHERE id = 1")
            if rows and rows[0][0] == stamp:
                lag[name] = time.monotonic() - started
                pending.discard(name)
        time.sleep(0.01)
    lag.update({name: None for name in pending})
    return lag


def db_status(ctx: Context, heartbeat: bool = True) -> dict:
    names = sorted((r.name for r in ctx.state.servers.values() if r.role.startswith("db-")),
                   key=lambda n: (ctx.state.servers[n].role != "db-primary", n))
    servers = [server_status(ctx, n) for n in names]
    primary = ctx.state.one("db-primary")
    streams = replication(ctx, primary.name) if primary else []
    by_name = {s["name"]: s for s in streams}
    replicas = [s["name"] for s in servers if s["role"] == "db-replica" and s.get("up")]
    measured = measure_lag(ctx, primary.name, replicas) if heartbeat and primary and replicas else {}
    for s in servers:
        if s["role"] == "db-replica":
            stream = by_name.get(s["name"], {})
            s.update(state=stream.get("state", "not streaming"), sync_state=stream.get("sync_state"),
                     lag_bytes=stream.get("lag_bytes"), replay_lag_s=stream.get("replay_lag_s"),
                     heartbeat_lag_s=measured.get(s["name"]))
    return {"environment": ctx.env_name, "synchronous": ctx.env.db.synchronous, "servers": servers}
