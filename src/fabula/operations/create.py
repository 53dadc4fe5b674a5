"""`fabula create`: bring up the whole architecture, idempotently.

Order (as FabulAWS does it): servers and firewalls; then the databases, the cache and the
release build side by side; then the worker, which runs migrations; then the web servers; the
load balancer last, so web servers take traffic only once the schema is in place.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fabula import pki, release, secrets
from fabula.autoscaling.controller import start_controller
from fabula.autoscaling.policy import desired_for_create
from fabula.context import Context
from fabula.db.topology import apply_synchronous
from fabula.deploy import native
from fabula.deploy.group import wait_healthy
from fabula.environment.audit import operation
from fabula.environment.firewall import apply_firewalls
from fabula.errors import ConfigError, FabulaError
from fabula.providers.base import Backend, Host
from fabula.roles import ROLES
from fabula.roles.web import HTTPS_PORT
from fabula.roles.worker import migrate
from fabula.supervisor import Supervisor
from fabula.topology import plan_servers


def check_subnet_unchanged(ctx: Context) -> None:
    wanted, have = ctx.env.subnet, ctx.state.subnet
    if wanted is not None and have is not None and str(wanted) != have:
        raise ConfigError(f"{ctx.config.path}: environments.{ctx.env_name}.subnet: {ctx.env_name} was created "
                          f"in {have}; its servers cannot move to {wanted}",
                          f"set subnet back to {have}, or `fabula destroy {ctx.env_name}` and create it again")


def in_parallel(ctx: Context, items: list, action: Callable) -> list:
    """Run `action` on each item at once; if any fail, raise one error naming each failure."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        futures = [pool.submit(action, item) for item in items]
    errors = [e for e in (f.exception() for f in futures) if e is not None]
    if errors:
        if len(errors) == 1:
            raise errors[0]
        raise FabulaError("\n".join(str(e) for e in errors))
    return [f.result() for f in futures]


def create(ctx: Context) -> None:
    ctx.provider.check_prerequisites()
    ctx.provider.check_can_create(str(ctx.config.path))
    check_subnet_unchanged(ctx)
    started = time.monotonic()
    if not ctx.state.subnet:
        # a subnet that clashes with the machine's routes or another environment's is bad input:
        # refused here, before anything is made
        ctx.provider.allocate_subnet()
    ctx.paths.env_dir.mkdir(parents=True, exist_ok=True)
    # the lock is taken only after the checks above: bad input must leave nothing behind
    with operation(ctx, "create") as op:
        op.details["from_release"] = ctx.state.release
        # the platform's own web group (an Auto Scaling group) launches the web servers: they are
        # not planned as servers, but brought up from the release once it is built
        group = ctx.provider.web_group(ctx)
        with op.phase("servers"):
            ctx.state.web_desired = desired_for_create(ctx.env, ctx.state)  # the web group's count
            ctx.state.web_desired_config = ctx.env.web_group().desired
            ctx.state.servers = plan_servers(ctx.env, ctx.state, native_web_group=group is not None)
            ctx.state.save(ctx.paths)  # recorded before anything is made, so `destroy` can always find it
            ctx.provider.ensure_accounts()
            ctx.secrets = secrets.load_or_create(ctx.paths)
            ctx.ca = pki.CertificateAuthority(ctx.paths)

            ctx.out.step("network", f"subnet {ctx.state.subnet}" if ctx.state.subnet else
                         f"{ctx.provider.name}: the inventory's hosts")
            ctx.provider.ensure_network()
            servers = list(ctx.state.servers.values())
            for record in servers:
                host = ctx.provider.ensure_server(record.name, record.role)
                ctx.provider.prepare_host(host, ROLES[record.role].packages)
                ctx.hosts[record.name] = host
            apply_firewalls(ctx)
            in_parallel(ctx, list(ctx.hosts.values()), lambda h: Supervisor(h).ensure_running())
            ctx.out.step("servers", f"{len(servers)} up: "
                         + ", ".join(f"{s.name} {s.address}" for s in servers))

        def databases() -> None:
            converge(ctx, ctx.host(ctx.state.require("db-primary").name))
            in_parallel(ctx, [ctx.host(r.name) for r in ctx.state.by_role("db-replica")],
                        lambda h: converge(ctx, h))
            apply_synchronous(ctx)

        def cache() -> None:
            converge(ctx, ctx.host(ctx.state.require("cache").name))

        def build() -> None:
            # the group keeps the release it was deployed with; the first create builds HEAD
            kept = release.load(ctx, ctx.state.release) if ctx.state.release else None
            ctx.release = kept or release.build(ctx)
            op.details["to_release"] = ctx.release.id

        with op.phase("databases+cache+build"):
            in_parallel(ctx, [databases, cache, build], lambda job: job())

        workers = [ctx.host(s.name) for s in ctx.state.by_role("worker")]
        webs = [] if group is not None else [ctx.host(s.name) for s in ctx.state.by_role("web")]
        if group is not None:
            with op.phase("web group"):  # its instances, out of the load balancer until converged
                webs = native.bring_up(ctx, group, ctx.require_release())
        with op.phase("worker"):  # the migrations run here, before any web server takes traffic
            in_parallel(ctx, workers, lambda h: converge(ctx, h))
            if not workers:
                migrate_on = webs[0]
                ROLES["web"].converge(ctx, migrate_on)
                migrate(ctx, migrate_on)
        with op.phase("web"):
            in_parallel(ctx, webs, lambda h: converge(ctx, h))

        with op.phase("load balancer"):
            ctx.provider.load_balancer.ensure([Backend(h.name, h.address, HTTPS_PORT) for h in webs])
            wait_in_service(ctx, [h.name for h in webs])
        built = ctx.require_release()
        for record in ctx.state.servers.values():
            if record.role in ("web", "worker"):
                record.release = built.id
        ctx.state.release = built.id
        ctx.state.save(ctx.paths)
        remove_surplus(ctx)
        if ctx.env.fixed_inventory:
            ctx.out.step("web group", f"fixed inventory of {len(webs)} web host(s): no autoscaler (hosts are not "
                         "fabula's to make or replace)")
        elif group is not None:
            ctx.out.step("web group", f"the platform's own group of {len(webs)} web server(s): its scaling policy "
                         "keeps its size, not fabula's autoscaler")
        else:
            with op.phase("autoscaler"):  # keeps the web group at its size and healthy from now on
                start_controller(ctx)
    ctx.out.step("done", f"environment {ctx.env_name} is up in {time.monotonic() - started:.1f}s")


def converge(ctx: Context, host: Host) -> None:
    ROLES[host.role].converge(ctx, host)


def wait_in_service(ctx: Context, names: list[str]) -> None:
    wait_healthy(ctx, names)
    ctx.out.step("lb", f"{len(names)} web server(s) in service at {ctx.provider.load_balancer.url()}")


def remove_surplus(ctx: Context) -> None:
    """Servers that exist on the machine but are no longer in the plan (fewer web servers asked)."""
    for name in ctx.provider.list_servers():
        if name not in ctx.state.servers:
            ctx.out.step(name, "removing (no longer in fabula.yml)")
            ctx.provider.remove_server(name)
