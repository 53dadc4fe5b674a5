"""PostgreSQL 15 as both database roles run it: files, TLS certificate, program, readiness, SQL."""
from __future__ import annotations

from pathlib import PurePosixPath

from fabula.context import Context
from fabula.errors import FabulaError
from fabula.providers.base import Host, Result, poll
from fabula.roles.base import ensure_certificate
from fabula.supervisor import Program, Supervisor
from fabula.templates import render

PG_BIN = PurePosixPath("/usr/lib/postgresql/15/bin")
PACKAGES = ("postgresql-15",)


def client_networks(ctx: Context, roles: tuple[str, ...]) -> list[str]:
    """Where the servers of `roles` connect from, for pg_hba.conf: the environment's subnet when
    one network holds every server (local), else each server's own address (ssh)."""
    if ctx.state.subnet:
        return [ctx.state.subnet]
    return sorted({f"{s.address}/32" if s.address.replace(".", "").isdigit() else s.address
                   for s in ctx.state.servers.values() if s.role in roles and s.address})


def data_dir(host: Host) -> PurePosixPath:
    return host.path("data", "postgresql")


def conf_dir(host: Host) -> PurePosixPath:
    return host.path("etc", "postgresql")


def socket_dir(host: Host) -> PurePosixPath:
    return host.path("run", "postgresql")


def is_initialized(host: Host) -> bool:
    return host.read_file(data_dir(host) / "PG_VERSION") is not None


def install_config(ctx: Context, host: Host, primary_conninfo: str | None = None) -> bool:
    host.make_dirs([conf_dir(host)], mode=0o700, owner=host.accounts.db)
    # the Unix socket admits the database superuser by peer authentication: its folder is the
    # environment's database user's alone
    host.make_dirs([socket_dir(host)], mode=0o700, owner=host.accounts.db)
    changed = ensure_certificate(ctx, host, conf_dir(host) / "server.crt", conf_dir(host) / "server.key",
                                 owner=host.accounts.db)
    changed |= host.put_file(conf_dir(host) / "root.crt", ctx.require_ca().cert_pem, owner=host.accounts.db)
    changed |= host.put_file(conf_dir(host) / "postgresql.conf", render(
        __file__, "postgresql.conf.j2", name=host.name, role=host.role, address=host.address,
        socket_dir=socket_dir(host), conf_dir=conf_dir(host), primary_conninfo=primary_conninfo,
        slot=slot_name(host.name), sync_names=sync_names(ctx, host)), owner=host.accounts.db)
    changed |= host.put_file(conf_dir(host) / "pg_hba.conf", render(
        __file__, "pg_hba.conf.j2", database=ctx.database_name, app_sources=client_networks(ctx, ("web", "worker")),
        replication_sources=client_networks(ctx, ("db-primary", "db-replica"))), owner=host.accounts.db)
    changed |= host.put_file(conf_dir(host) / "pg_ident.conf", render(
        __file__, "pg_ident.conf.j2", db_user=host.accounts.db), owner=host.accounts.db)
    return changed


def sync_names(ctx: Context, host: Host) -> str:
    """synchronous_standby_names for a primary: its streaming replicas, when db.synchronous."""
    if is_primary(ctx, host) and ctx.env.db.synchronous and ctx.state.sync_standbys:
        return "FIRST 1 (" + ", ".join(f'"{n}"' for n in ctx.state.sync_standbys) + ")"
    return ""


def is_primary(ctx: Context, host: Host) -> bool:
    record = ctx.state.servers.get(host.name)
    return record is not None and record.role == "db-primary"


def slot_name(server: str) -> str:
    return "fabula_" + server.replace("-", "_")


def program(host: Host) -> Program:
    return Program(name="postgresql", user=host.accounts.db,
                   command=[str(PG_BIN / "postgres"), "-D", str(data_dir(host)),
                            "-c", f"config_file={conf_dir(host) / 'postgresql.conf'}"],
                   environment={"HOME": str(conf_dir(host))},  # libpq looks for client certificates in ~
                   stopsignal="INT", stopwaitsecs=60, startsecs=1)


def start(host: Host, config_changed: bool) -> None:
    """Start PostgreSQL, or reload it if its configuration changed: every setting fabula changes
    after the first start (hba, TLS files, replication, synchronous names) takes a reload, so
    connections in use are never cut for it."""
    supervisor = Supervisor(host)
    started = supervisor.apply([program(host)])
    if supervisor.status().get("postgresql") != "RUNNING":
        supervisor.start("postgresql", timeout=120)  # e.g. stopped for a rebuild
    wait_ready(host)
    if config_changed and not started:
        psql(host, "SELECT pg_reload_conf()")


def wait_ready(host: Host, timeout: float = 90) -> None:
    probe = [str(PG_BIN / "pg_isready"), "-q", "-h", str(socket_dir(host))]
    if not poll(lambda: host.run(probe, timeout=10).ok, timeout, interval=0.2):
        raise FabulaError(f"{host.name}: PostgreSQL is not ready after {timeout:.0f}s",
                          f"see `fabula logs <env> {host.name} postgresql`")


def psql(host: Host, sql: str, database: str = "postgres") -> Result:
    """Run SQL as the postgres superuser over the server's Unix socket (given on stdin, so that
    passwords in it never appear in a process list)."""
    return host.check([str(PG_BIN / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                       "-h", str(socket_dir(host)), "-U", "postgres", "-d", database],
                      user=host.accounts.db, input=sql)
