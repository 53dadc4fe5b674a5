"""Keeping the environment in step with which database server is primary and which replicas
serve: synchronous replication, and the app servers' PgBouncers."""
from __future__ import annotations

from fabula.context import Context
from fabula.parallel import at_once
from fabula.providers.base import Host
from fabula.roles import appserver, postgres


def apply_synchronous(ctx: Context) -> None:
    """With db.synchronous, make the primary wait for its streaming replicas on commit. Set only
    once they stream: before that, a commit would wait for a replica that is not there."""
    wanted = [r.name for r in ctx.state.serving_replicas()] if ctx.env.db.synchronous else []
    primary = ctx.host(ctx.state.require("db-primary").name)
    if wanted != ctx.state.sync_standbys:
        ctx.state.sync_standbys = wanted
        ctx.state.save(ctx.paths)
    if postgres.install_config(ctx, primary):
        postgres.psql(primary, "SELECT pg_reload_conf()")
        if wanted:
            ctx.out.step(primary.name, f"commits wait for {', '.join(wanted)} (synchronous replication)")


def app_hosts(ctx: Context) -> list[Host]:
    """The servers whose PgBouncer the app uses: every web server and worker."""
    return [ctx.host(r.name) for r in ctx.state.servers.values() if r.role in ("web", "worker")]


def repoint_app_servers(ctx: Context) -> None:
    """Point every web and worker PgBouncer at the current primary and serving replica. An online
    reload: client connections stay, server connections move as they are released."""
    hosts = app_hosts(ctx)

    def repoint(host: Host) -> None:
        _, how = appserver.pgbouncer(ctx, host)
        if how:
            appserver.apply_pgbouncer_change(host, how)
            ctx.out.step(host.name, "PgBouncer repointed")
    # all at once: in a failover, the app's writes wait until its server's PgBouncer is repointed
    at_once(hosts, repoint, name=lambda h: h.name)
