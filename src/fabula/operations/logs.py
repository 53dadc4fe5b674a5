"""`fabula logs`: the services' logs, read on each server through its transport (a namespace
here, SSH elsewhere), never from this machine's files."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

from fabula.context import Context
from fabula.errors import FabulaError
from fabula.providers.base import Host
from fabula.roles import ROLES

PLATFORM = "lb"  # what `fabula logs ENV lb` names: the load balancer's host and fabula's own programs
PLATFORM_PROGRAMS = ("haproxy", "autoscaler")


def log_sources(ctx: Context, server: str | None, service: str | None) -> list[tuple[Host, list[PurePosixPath]]]:
    """Each host with the log files to show: one service, one server's or every server's."""
    if server == PLATFORM:
        host = ctx.provider.platform_host()
        wanted = {host: [service] if service else list(PLATFORM_PROGRAMS)}
    else:
        if server is not None and server not in ctx.state.servers:
            known = ", ".join(sorted(ctx.state.servers)) or "none (run `fabula create` first)"
            raise FabulaError(f"environment {ctx.env_name} has no server {server!r}", f"servers: {known}, or lb")
        wanted = {}
        for name in [server] if server else sorted(ctx.state.servers):
            record = ctx.state.servers[name]
            services = list(ROLES[record.role].services_for(ctx))
            if service and service not in services:
                raise FabulaError(f"{name} ({record.role}) runs no service {service!r}",
                                  f"use one of: {', '.join(services)}")
            wanted[ctx.host(name)] = [service] if service else services
    sources = []
    for host, names in wanted.items():
        # a service's access log (nginx's: every request, written by nginx itself) beside its own
        paths = [host.path("log", f"{n}{kind}.log") for n in names for kind in ("", "-access")]
        paths = [p for p in paths if host.stat(p) is not None]
        if paths:
            sources.append((host, paths))
    if not sources:
        raise FabulaError("no logs yet", f"has `fabula create {ctx.env_name}` run?")
    return sources


def show_logs(sources: list[tuple[Host, list[PurePosixPath]]], lines: int, follow: bool) -> int:
    """`tail` on each host, the terminal attached; followed on all hosts at once. The highest exit status."""
    argv = ["tail", "-v", "-n", str(lines), *(["-F"] if follow else [])]

    def tail(source: tuple[Host, list[PurePosixPath]]) -> int:
        host, paths = source
        return host.interactive(argv + [str(p) for p in paths])

    if not follow:
        return max(tail(source) for source in sources)
    with ThreadPoolExecutor(max_workers=len(sources)) as pool:
        return max(pool.map(tail, sources))
