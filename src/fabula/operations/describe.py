"""`fabula describe`: every server's state, services, release and load-balancer health."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from fabula.context import Context
from fabula.db.status import replication
from fabula.environment import lock
from fabula.autoscaling.report import group_report
from fabula.roles import ROLES
from fabula.supervisor import RUNNING, Supervisor


def server_report(ctx: Context, name: str, lb_health: dict[str, str]) -> dict:
    record = ctx.state.servers[name]
    expected = ROLES[record.role].services_for(ctx)
    report = {"name": name, "role": record.role, "address": record.address, "release": record.release,
              "services": {s: "down" for s in expected}, "lb": lb_health.get(name) if record.role == "web" else None}
    if not ctx.provider.server_exists(name):
        report["state"] = "missing"
        return report
    states = Supervisor(ctx.host(name)).status()
    if not states:
        report["state"] = "stopped"
        return report
    report["services"] = {s: ("up" if states.get(s) == RUNNING else (states.get(s) or "missing").lower())
                          for s in expected}
    report["state"] = "running" if all(v == "up" for v in report["services"].values()) else "degraded"
    return report


def describe(ctx: Context) -> dict:
    lb = ctx.provider.load_balancer
    health = lb.health()
    names = sorted(ctx.state.servers, key=_order(ctx))
    with ThreadPoolExecutor(max_workers=max(len(names), 1)) as pool:
        servers = list(pool.map(lambda n: server_report(ctx, n, health), names))
    primary = ctx.state.one("db-primary")
    streams = {s["name"]: s for s in replication(ctx, primary.name)} if primary else {}
    for server in servers:
        if server["role"] == "db-replica":
            stream = streams.get(server["name"], {})
            server["replication"] = {"state": stream.get("state", "not streaming"),
                                     "sync_state": stream.get("sync_state"), "lag_bytes": stream.get("lag_bytes")}
    return {
        "project": ctx.project, "environment": ctx.env_name, "provider": ctx.state.provider,
        "url": lb.url(), "release": ctx.state.release, "subnet": ctx.state.subnet,
        "load_balancer": {"running": lb.is_running(), "url": lb.url(), "backends": health},
        "servers": servers, "exists": ctx.paths.state_file.exists(),
        "lock": lock.report(ctx.paths),  # who is changing the environment right now, if anyone
        # the web group: min/desired/max, target, demand, suspended processes, last decisions
        "autoscaling": group_report(ctx, health) if ctx.paths.state_file.exists() else None,
    }


def _order(ctx: Context):
    rank = {"db-primary": 0, "db-replica": 1, "cache": 2, "worker": 3, "web": 4}
    return lambda n: (rank.get(ctx.state.servers[n].role, 9), n)
