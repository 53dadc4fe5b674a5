"""db-replica: a hot standby fed by streaming replication from the primary (pg_basebackup, then
a replication slot so the primary keeps the WAL the replica has not yet received)."""
from __future__ import annotations

import time
from pathlib import PurePosixPath

from fabula.context import Context
from fabula.errors import FabulaError
from fabula.providers.base import EgressRule, Host, IngressRule
from fabula.roles import postgres
from fabula.roles.base import Role, remove_interrupted
from fabula.supervisor import Supervisor


class DatabaseReplica(Role):
    name = "db-replica"
    packages = postgres.PACKAGES
    services = ("postgresql",)

    def ingress(self, ctx: Context) -> list[IngressRule]:
        return [IngressRule(5432, "postgresql reads from web and worker", from_roles=("web", "worker"))]

    def egress(self, ctx: Context) -> list[EgressRule]:
        return [EgressRule(5432, "replication from the primary", to_roles=("db-primary",))]

    def conninfo(self, ctx: Context, host: Host) -> str:
        primary = ctx.state.require("db-primary")
        conf = postgres.conf_dir(host)
        return (f"host={primary.address} port=5432 user=replicator passfile={conf / 'pgpass'} "
                f"sslmode=verify-full sslrootcert={conf / 'root.crt'} application_name={host.name}")

    def converge(self, ctx: Context, host: Host) -> None:
        primary = ctx.state.require("db-primary")
        host.make_dirs([postgres.conf_dir(host)], mode=0o700, owner=host.accounts.db)
        host.put_file(postgres.conf_dir(host) / "pgpass",
                      f"{primary.address}:5432:*:replicator:{ctx.require_secrets().db_replication_password}\n",
                      mode=0o600, owner=host.accounts.db)
        changed = postgres.install_config(ctx, host, primary_conninfo=self.conninfo(ctx, host))
        record = ctx.state.servers[host.name]
        if record.rebuild and postgres.is_initialized(host):
            ctx.out.step(host.name, f"rebuilding as a replica of {primary.name}")
            Supervisor(host).stop("postgresql", timeout=90)
            host.check(["rm", "-rf", str(postgres.data_dir(host))])
        if not postgres.is_initialized(host):
            self._base_backup(ctx, host)
        postgres.start(host, changed)
        wait_streaming(host)
        if record.rebuild:
            record.rebuild = False
            ctx.state.save(ctx.paths)
        ctx.out.step(host.name, f"PostgreSQL replica streaming from {primary.name}")

    def _base_backup(self, ctx: Context, host: Host) -> None:
        data = postgres.data_dir(host)
        partial = f"{data}.partial"
        ctx.out.step(host.name, "pg_basebackup from the primary")
        remove_interrupted(host, partial)
        host.make_dirs([PurePosixPath(partial)], mode=0o700, owner=host.accounts.db)
        host.check([str(postgres.PG_BIN / "pg_basebackup"), "-d", self.conninfo(ctx, host), "-D", partial,
                    "-X", "stream", "-S", postgres.slot_name(host.name), "-c", "fast"],
                   user=host.accounts.db, timeout=1800)
        host.check(["touch", f"{partial}/standby.signal"], user=host.accounts.db)
        host.check(["mv", partial, str(data)])


def wait_streaming(host: Host, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while postgres.psql(host, "SELECT status FROM pg_stat_wal_receiver").stdout.strip() != "streaming":
        if time.monotonic() > deadline:
            raise FabulaError(f"{host.name}: the replica is not streaming from the primary after {timeout:.0f}s",
                              f"see `fabula logs <env> {host.name} postgresql`")
        time.sleep(0.3)
