"""db-primary: the PostgreSQL primary. Accepts only TLS connections, from web and worker servers
(and the replicas, for replication)."""
from __future__ import annotations

from pathlib import PurePosixPath

from fabula.context import Context
from fabula.providers.base import Host, IngressRule
from fabula.roles import postgres
from fabula.roles.base import Role, remove_interrupted


class DatabasePrimary(Role):
    name = "db-primary"
    packages = postgres.PACKAGES
    services = ("postgresql",)

    def ingress(self, ctx: Context) -> list[IngressRule]:
        return [IngressRule(5432, "postgresql from web, worker and replicas",
                            from_roles=("web", "worker", "db-replica"))]

    def converge(self, ctx: Context, host: Host) -> None:
        if not postgres.is_initialized(host):
            self._initdb(ctx, host)
        changed = postgres.install_config(ctx, host)
        postgres.start(host, changed)
        ctx.out.step(host.name, "PostgreSQL primary accepting connections")
        postgres.psql(host, self._setup_sql(ctx))

    def _initdb(self, ctx: Context, host: Host) -> None:
        data = postgres.data_dir(host)
        partial = f"{data}.partial"
        ctx.out.step(host.name, "initdb")
        remove_interrupted(host, partial)
        host.make_dirs([PurePosixPath(partial)], mode=0o700, owner=host.accounts.db)
        host.check([str(postgres.PG_BIN / "initdb"), "-D", partial, "-U", "postgres", "-E", "UTF8",
                    "--locale=C.UTF-8", "--auth-local=peer", "--auth-host=scram-sha-256"],
                   user=host.accounts.db, timeout=300)
        host.check(["mv", partial, str(data)])

    def _setup_sql(self, ctx: Context) -> str:
        db, s = ctx.database_name, ctx.require_secrets()
        slots = "\n".join(
            f"SELECT pg_create_physical_replication_slot('{postgres.slot_name(r.name)}') WHERE NOT EXISTS "
            f"(SELECT FROM pg_replication_slots WHERE slot_name = '{postgres.slot_name(r.name)}');"
            for r in ctx.state.by_role("db-replica"))
        return f"""
SELECT 'CREATE ROLE app LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app')\\gexec
ALTER ROLE app LOGIN PASSWORD '{s.db_app_password}';
SELECT 'CREATE ROLE replicator REPLICATION LOGIN'
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'replicator')\\gexec
ALTER ROLE replicator REPLICATION LOGIN PASSWORD '{s.db_replication_password}';
SELECT 'CREATE DATABASE {db} OWNER app' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{db}')\\gexec
{slots}
"""
