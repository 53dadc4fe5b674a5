"""The web tier as a group: web servers are launched from a release (the launch configuration),
join the load balancer only once healthy, and leave it by draining, so no request is cut."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

from fabula.context import Context, Release
from fabula.environment.firewall import apply_firewalls
from fabula.errors import FabulaError
from fabula.parallel import at_once
from fabula.providers.base import Backend, Host, poll
from fabula.roles import ROLES
from fabula.roles.web import HTTPS_PORT
from fabula.state import ServerRecord
from fabula.supervisor import Supervisor
from fabula.topology import new_server

DRAIN_TIMEOUT = 60


def web_names(ctx: Context) -> list[str]:
    return [r.name for r in ctx.state.by_role("web")]


def set_backends(ctx: Context, names: list[str]) -> None:
    """The load balancer forwards to exactly these web servers (a seamless reload)."""
    records = [ctx.state.servers[n] for n in names]
    ctx.provider.load_balancer.ensure([Backend(r.name, r.address, HTTPS_PORT) for r in records])


def wait_healthy(ctx: Context, names: list[str], timeout: float = 60) -> None:
    down: list[str] = []  # as the last look found them: the error names them

    def all_up() -> bool:
        health = ctx.provider.load_balancer.health()
        down[:] = [n for n in names if health.get(n) != "UP"]
        return not down

    if not poll(all_up, timeout, interval=0.2):
        raise FabulaError(f"load balancer: {', '.join(down)} not healthy after {timeout:.0f}s "
                          f"(GET /healthcheck.html over HTTPS)", f"see `fabula logs {ctx.env_name} {down[0]}`")


def reserve_web_servers(ctx: Context, release: Release, count: int, warm: bool = False) -> list[ServerRecord]:
    """The records of `count` new web servers (of the warm pool, with `warm`), saved before the
    servers exist, so that destroy finds them after a crash."""
    records = []
    for _ in range(count):
        record = new_server(ctx.state, "web")
        record.release, record.warm = release.id, warm
        ctx.state.servers[record.name] = record
        records.append(record)
    ctx.state.save(ctx.paths)
    return records


def launch_web_servers(ctx: Context, release: Release, count: int, in_service: bool = True,
                       reserved: list[ServerRecord] | None = None) -> list[ServerRecord]:
    """Start `count` new web servers from `release` at once (as an autoscaling group's surge), or
    those `reserved` before; with in_service, add them to the load balancer and return once their
    health checks pass."""
    records = reserved if reserved is not None else reserve_web_servers(ctx, release, count)
    for record in records:     # one after another: the provider's network changes are not shared
        host = ctx.provider.ensure_server(record.name, record.role)
        ctx.hosts[record.name] = host
        ctx.out.step(record.name, f"launching from release {release.id} at {host.address}")
    hosts = [ctx.hosts[r.name] for r in records]
    at_once(hosts, lambda h: ctx.provider.prepare_host(h, ROLES["web"].packages))
    apply_firewalls(ctx)  # the cache and databases admit the new addresses
    previous, ctx.release = ctx.release, release
    try:
        at_once(hosts, lambda h: _start_web(ctx, h), name=lambda h: h.name)
    finally:
        ctx.release = previous
    if in_service:
        bring_into_service(ctx, [r.name for r in records])
    return records


def _start_web(ctx: Context, host: Host) -> None:
    Supervisor(host).ensure_running()
    ROLES["web"].converge(ctx, host)


def launch_or_remove(ctx: Context, release: Release, in_service: bool = True,
                     then: Callable[[ServerRecord], object] | None = None) -> ServerRecord:
    """launch_or_remove_many for one server."""
    return launch_or_remove_many(ctx, release, 1, in_service, then=lambda records: then and then(records[0]))[0]


def launch_or_remove_many(ctx: Context, release: Release, count: int, in_service: bool = True,
                          then: Callable[[list[ServerRecord]], object] | None = None,
                          reserved: list[ServerRecord] | None = None) -> list[ServerRecord]:
    """launch_web_servers, then `then(records)`; if either fails, every server that appeared
    meanwhile (or was `reserved` for it) is retired and the error goes on to the caller, who words
    it. A failed removal only warns: the launch's error says what went wrong, the removal's would
    hide it."""
    before = set(ctx.state.servers) - {r.name for r in reserved or []}
    try:
        records = launch_web_servers(ctx, release, count, in_service, reserved)
        if then:
            then(records)
        return records
    except Exception:
        for name in set(ctx.state.servers) - before:
            try:
                retire_web_server(ctx, name)
            except Exception as cleanup:  # noqa: BLE001 - report the launch's error, not this one
                ctx.out.warn(f"could not remove the failed web server {name}: {cleanup}")
        raise


def bring_into_service(ctx: Context, names: list[str], timeout: float = 60) -> None:
    already = serving(ctx)
    set_backends(ctx, [n for n in web_names(ctx) if n in names or n in already])
    wait_healthy(ctx, names, timeout)
    for name in names:
        ctx.out.step(name, "in service")


def serving(ctx: Context) -> set[str]:
    return set(ctx.provider.load_balancer.health())


def retire_web_server(ctx: Context, name: str, timeout: float = DRAIN_TIMEOUT) -> None:
    """Drain a web server (no new requests; those in flight finish), take it out of the load
    balancer, then remove it."""
    retire_web_servers(ctx, [name], timeout)


def retire_web_servers(ctx: Context, names: list[str], timeout: float = DRAIN_TIMEOUT) -> None:
    """retire_web_server for several at once: all drained together, then removed."""
    lb = ctx.provider.load_balancer
    already = serving(ctx)
    draining = [n for n in names if n in already]
    for name in draining:
        lb.drain(name)
        ctx.out.step(name, "draining")
    if draining:
        def wait(name: str) -> None:
            if not lb.wait_drained(name, timeout):
                ctx.out.warn(f"{name} still serves requests after {timeout:.0f}s of draining: they are cut")
        at_once(draining, wait)
    removed: list[str] = []

    def remove(name: str) -> None:
        ctx.provider.remove_server(name, drained=True)
        removed.append(name)
        ctx.out.step(name, "removed")

    def leave_the_load_balancer() -> None:
        set_backends(ctx, [n for n in serving(ctx) if n not in names and n in ctx.state.servers])
    # the load balancer's new configuration (a reload) and the removals at once: drained, they get
    # no request from the load balancer as it runs now, and its next configuration no longer has them
    jobs: list[tuple[str, Callable[[], None]]] = [(name, partial(remove, name)) for name in names]
    if draining:
        jobs.insert(0, ("load balancer", leave_the_load_balancer))
    try:
        at_once(jobs, lambda job: job[1](), name=lambda job: job[0])
    finally:   # the state forgets those removed, also when another one could not be
        for name in removed:
            ctx.state.servers.pop(name, None)
            ctx.hosts.pop(name, None)
        ctx.state.save(ctx.paths)
    apply_firewalls(ctx)
