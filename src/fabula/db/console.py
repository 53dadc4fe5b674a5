"""`fabula db psql`: an interactive psql (or one query) on a database server, as PostgreSQL's
superuser over the server's Unix socket, in the app's database. Like `heroku pg:psql`: the
operator needs no password and no open port, and nothing runs as root on the server."""
from __future__ import annotations

from fabula.context import Context
from fabula.db.backup import primary_host
from fabula.errors import FabulaError
from fabula.providers.base import Host
from fabula.roles import postgres

DB_ROLES = ("db-primary", "db-replica")


def psql_session(ctx: Context, server: str | None, args: list[str]) -> tuple[Host, list[str]]:
    """The host and psql argv for `server` (the primary when None); `args` go to psql as given."""
    if server is None:
        host = primary_host(ctx)
    else:
        record = ctx.state.servers.get(server)
        if record is None or record.role not in DB_ROLES:
            known = ", ".join(sorted(n for n, r in ctx.state.servers.items() if r.role in DB_ROLES)) or "none"
            raise FabulaError(f"environment {ctx.env_name} has no database server {server!r}",
                              f"database servers: {known}")
        host = ctx.host(server)
    argv = [str(postgres.PG_BIN / "psql"), "-X", "-h", str(postgres.socket_dir(host)), "-U", "postgres",
            "-d", ctx.database_name, *args]
    return host, argv
