"""`fabula describe`: every server's state, services, release and load-balancer health."""
from __future__ import annotations

import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

from fabula.autoscaling.report import group_report
from fabula.context import Context
from fabula.db.status import replication
from fabula.environment import lock
from fabula.errors import FabulaError
from fabula.providers.base import Host
from fabula.roles import ROLES
from fabula.roles.appserver import APP_PORT, PGBOUNCER_PORT
from fabula.roles.cache import AMQP_PORT, REDIS_PORT
from fabula.roles.web import HTTPS_PORT, gunicorn_socket
from fabula.supervisor import RUNNING, WAKEUP, Supervisor

POSTGRES_PORT = 5432


def endpoints(host: Host) -> dict[str, tuple[str, int] | PurePosixPath]:
    """Service -> where it accepts connections once it serves (an address and port, or a Unix
    socket): a program its supervisor calls RUNNING (it has stayed up `startsecs`) may still be
    booting (RabbitMQ, PostgreSQL's recovery)."""
    address = host.address
    return {"nginx": (address, HTTPS_PORT), "gunicorn": gunicorn_socket(host) or ("127.0.0.1", APP_PORT),
            "pgbouncer": ("127.0.0.1", PGBOUNCER_PORT), "redis": (address, REDIS_PORT),
            "rabbitmq": (address, AMQP_PORT), "postgresql": (address, POSTGRES_PORT)}


# connects to the Unix socket $1 (bash's /dev/tcp has no Unix sockets; curl would send a request)
UNIX_CONNECT = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"


def accepting(host: Host, targets: dict[str, tuple[str, int] | PurePosixPath]) -> set[str]:
    """Those of `targets` that accept a connection, tried from inside the server."""
    if not targets:
        return set()

    def attempt(target: tuple[str, int] | PurePosixPath) -> str:
        if isinstance(target, PurePosixPath):
            return f"python3 -c {shlex.quote(UNIX_CONNECT)} {shlex.quote(str(target))}"
        address, port = target
        return f"(exec 3<>/dev/tcp/{address}/{port})"
    script = "; ".join(f"{attempt(target)} 2>/dev/null && echo {name}" for name, target in sorted(targets.items()))
    return set(host.run(["timeout", "3", "bash", "-c", script], timeout=10).stdout.split())


def server_report(ctx: Context, name: str, lb_health: dict[str, str]) -> dict:
    record = ctx.state.servers[name]
    expected = ROLES[record.role].services_for(ctx)
    report = {"name": name, "role": record.role, "address": record.address, "release": record.release,
              "services": {s: "down" for s in expected}, "lb": lb_health.get(name) if record.role == "web" else None,
              "warm": record.warm}
    if not ctx.provider.server_exists(name):
        report["state"] = "missing"
        return report
    try:
        return _running_report(ctx, name, record, expected, report)
    except FabulaError as exc:   # a host that does not answer (ssh: down, or cut off)
        report["state"], report["error"] = "unreachable", exc.message
        return report


def _running_report(ctx: Context, name: str, record, expected, report: dict) -> dict:
    states = Supervisor(ctx.host(name)).status()
    if not states:
        report["state"] = "stopped"
        return report
    # a program is up once it is RUNNING and, for a server, accepts connections: "down" while a
    # killed one is being started again, "starting", "backoff" or "fatal" (supervisor's states)
    host = ctx.host(name)
    ports = endpoints(host)
    listening = accepting(host, {s: ports[s] for s in expected
                                           if s in ports and states.get(s) == RUNNING})
    services = {s: ("up" if s in listening or s not in ports else "down") if states.get(s) == RUNNING
                else (states.get(s) or "missing").lower() for s in expected}
    report["services"] = services
    report["state"] = "running" if all(v == "up" for v in services.values()) else "degraded"
    return report


def shared_lock(ctx: Context) -> dict | None:
    """The team's lock (a provider with a shared store), as `lock.report` shows a local one."""
    store = ctx.provider.shared_store()
    holder = store.holder() if store is not None else None
    if holder is None:
        return None
    return {key: holder.get(key) for key in ("owner", "pid", "started", "action", "command")} | {
        "stale": False, "shared": True}


def describe(ctx: Context) -> dict:
    lb = ctx.provider.load_balancer
    health = lb.health()
    names = sorted(ctx.state.servers, key=_order(ctx))
    with ThreadPoolExecutor(max_workers=max(len(names), 1)) as pool:
        servers = list(pool.map(lambda n: server_report(ctx, n, health), names))
    primary = ctx.state.one("db-primary")
    try:
        streams = {s["name"]: s for s in replication(ctx, primary.name)} if primary else {}
    except FabulaError:   # the primary does not answer: its row says so
        streams = {}
    for server in servers:
        if server["role"] == "db-replica":
            stream = streams.get(server["name"], {})
            server["replication"] = {"state": stream.get("state", "not streaming"),
                                     "sync_state": stream.get("sync_state"), "lag_bytes": stream.get("lag_bytes")}
    return {
        "project": ctx.project, "environment": ctx.env_name, "provider": ctx.state.provider,
        "url": lb.url(), "release": ctx.state.release, "subnet": ctx.state.subnet,
        "load_balancer": {"running": lb.is_running(), "url": lb.url(), "backends": health,
                          "services": platform_services(ctx, lb)},
        "servers": servers, "exists": ctx.paths.state_file.exists(),
        "lock": shared_lock(ctx) or lock.report(ctx.paths),  # who is changing the environment now, if anyone
        # the web group: min/desired/max, target, demand, suspended processes, last decisions
        "autoscaling": group_report(ctx, health) if ctx.paths.state_file.exists() else None,
    }


def platform_services(ctx: Context, lb) -> dict[str, str]:
    """The programs of the load balancer's platform (HAProxy, the autoscaler): up, or their
    supervisor's state; nothing when its supervisor does not run."""
    if not lb.is_running():
        return {}
    states = Supervisor(ctx.provider.platform_host()).status()
    return {name: "up" if state == RUNNING else state.lower() for name, state in sorted(states.items())
            if name != WAKEUP}


def _order(ctx: Context):
    rank = {"db-primary": 0, "db-replica": 1, "cache": 2, "worker": 3, "web": 4}
    return lambda n: (rank.get(ctx.state.servers[n].role, 9), n)
