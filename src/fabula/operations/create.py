"""`fabula create`: bring up the whole architecture, idempotently.

Order: servers and firewalls; then the databases, the cache and the release build side by
side, each app server starting as soon as what it needs is there (a web server: its release; the
worker, which runs the migrations: the databases too); the web servers join the load balancer last,
so they take traffic only once the schema is in place (the load balancer itself starts beside them,
with no web servers).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from fabula import pki, release, secrets
from fabula.autoscaling.controller import install_controller, wait_controller
from fabula.autoscaling.policy import desired_for_create
from fabula.context import Context
from fabula.db.topology import apply_synchronous
from fabula.deploy import native
from fabula.deploy.group import wait_healthy
from fabula.environment.audit import operation
from fabula.environment.firewall import apply_firewalls
from fabula.errors import ConfigError
from fabula.parallel import at_once, results
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
    with operation(ctx, "create") as op, ThreadPoolExecutor(max_workers=1) as builder:
        op.details["from_release"] = ctx.state.release

        def build() -> None:
            # the group keeps the release it was deployed with; the first create builds HEAD
            kept = release.load(ctx, ctx.state.release) if ctx.state.release else None
            ctx.release = kept or release.build(ctx)
            op.details["to_release"] = ctx.release.id

        # the platform's own web group (an Auto Scaling group) launches the web servers: they are
        # not planned as servers, but brought up from the release once it is built
        group = ctx.provider.web_group(ctx)
        with op.phase("servers"):
            ctx.state.web_desired = desired_for_create(ctx.env, ctx.state)  # the web group's count
            ctx.state.web_desired_config = ctx.env.web_group().desired
            planned = plan_servers(ctx.env, ctx.state, native_web_group=group is not None)
            ctx.state.leaving.update({n: r for n, r in ctx.state.servers.items() if n not in planned})
            ctx.state.servers = planned
            ctx.state.save(ctx.paths)  # recorded before anything is made, so `destroy` can always find it
            ctx.provider.ensure_accounts()
            ctx.secrets = secrets.load_or_create(ctx.paths)
            ctx.ca = pki.CertificateAuthority(ctx.paths)

            ctx.out.step("network", f"subnet {ctx.state.subnet}" if ctx.state.subnet else
                         f"{ctx.provider.name}: the inventory's hosts")
            ctx.provider.ensure_network()
            # built on this machine while the servers come up: it needs the users, the secrets and
            # the network (the app's settings name the load balancer's address: on AWS, the ALB's)
            release_built = builder.submit(build)
            servers = list(ctx.state.servers.values())
            for record in servers:
                host = ctx.provider.ensure_server(record.name, record.role)
                ctx.provider.prepare_host(host, ROLES[record.role].packages)
                ctx.hosts[record.name] = host
            apply_firewalls(ctx)
            at_once(list(ctx.hosts.values()), lambda h: Supervisor(h).ensure_running())
            ctx.out.step("servers", f"{len(servers)} up: "
                         + ", ".join(f"{s.name} {s.address}" for s in servers))

        def databases() -> None:
            converge(ctx, ctx.host(ctx.state.require("db-primary").name))
            at_once([ctx.host(r.name) for r in ctx.state.by_role("db-replica")],
                        lambda h: converge(ctx, h))
            apply_synchronous(ctx)

        def cache() -> None:
            converge(ctx, ctx.host(ctx.state.require("cache").name))

        workers = [ctx.host(s.name) for s in ctx.state.by_role("worker")]
        # the platform's web group launches its instances from the built release: they join after
        webs = [] if group is not None else [ctx.host(s.name) for s in ctx.state.by_role("web")]
        def platform_programs() -> None:
            # the load balancer (with no web servers yet) and the autoscaler (which changes nothing
            # while this create holds the lock) start beside the app servers, off create's path; on
            # the platform's own group the autoscaler is installed last, once its instances are known
            ctx.provider.load_balancer.start_ahead()
            if group is None:
                install_controller(ctx)

        # each app server starts as soon as what it needs is there, not after the slowest (RabbitMQ):
        # a web server needs its release (its health check needs no database, and it takes no
        # traffic before the load balancer below, which waits for the migrations); the worker
        # needs the databases too, for the migrations it runs (Celery reaches the broker once up)
        with op.phase("databases+cache+build+app servers"), \
                ThreadPoolExecutor(max_workers=4 + len(workers) + len(webs)) as pool:
            primary = pool.submit(databases)
            jobs = [primary, release_built, pool.submit(cache), pool.submit(platform_programs)]

            def app_server(host: Host) -> None:
                release_built.result()
                if host.role == "worker":
                    primary.result()
                converge(ctx, host)

            if workers:
                jobs += [pool.submit(app_server, h) for h in workers + webs]
            results(jobs)
        if group is not None:
            with op.phase("web group"):  # its instances, out of the load balancer until converged
                webs = native.bring_up(ctx, group, ctx.require_release())
                if workers:  # else the web phase below converges them, migrating on the first
                    at_once(webs, lambda h: converge(ctx, h))
        if not workers:
            with op.phase("web"):  # the migrations run on the first, before any takes traffic
                ROLES["web"].converge(ctx, webs[0])
                migrate(ctx, webs[0])
                at_once(webs[1:], lambda h: converge(ctx, h))

        with op.phase("load balancer"):
            ctx.provider.load_balancer.ensure([Backend(h.name, h.address, HTTPS_PORT) for h in webs])
            wait_in_service(ctx, [h.name for h in webs])
        built = ctx.require_release()
        for record in ctx.state.servers.values():
            if record.role in ("web", "worker") and not record.warm:
                record.release = built.id
        ctx.state.release = built.id
        ctx.state.save(ctx.paths)
        remove_surplus(ctx)
        if ctx.env.fixed_inventory:
            ctx.out.step("web group", f"fixed inventory of {len(webs)} web host(s): not scaled (hosts are not "
                         "fabula's to make or replace)")
        elif group is not None:
            ctx.out.step("web group", f"the platform's own group of {len(webs)} web server(s): its scaling "
                         "policy keeps its size")
        # keeps the web group at its size and healthy from now on (on a platform's group: converges
        # what the group launches by itself; on a fixed inventory: watches the hosts)
        with op.phase("autoscaler"):
            if group is not None:
                install_controller(ctx)
            wait_controller(ctx)
    activity = ctx.provider.activity()
    if activity is not None:
        ctx.out.step(ctx.provider.name, activity)
    ctx.out.step("done", f"environment {ctx.env_name} is up in {time.monotonic() - started:.1f}s")


def converge(ctx: Context, host: Host) -> None:
    ROLES[host.role].converge(ctx, host)


def wait_in_service(ctx: Context, names: list[str]) -> None:
    wait_healthy(ctx, names)
    ctx.out.step("lb", f"{len(names)} web server(s) in service at {ctx.provider.load_balancer.url()}")


def remove_surplus(ctx: Context) -> None:
    """Servers that exist but are no longer in the plan (fewer web servers asked, a host taken
    out of `hosts:`); the state forgets them only once they are removed."""
    for name in ctx.provider.list_servers():
        if name not in ctx.state.servers:
            ctx.out.step(name, "removing (no longer in fabula.yml)")
            ctx.provider.remove_server(name)
            ctx.state.leaving.pop(name, None)
            ctx.state.save(ctx.paths)
    if ctx.state.leaving:
        ctx.state.leaving.clear()
        ctx.state.save(ctx.paths)
