"""`fabula db ...`: replication status, failover, replicas, backups."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fabula.cli.options import DEFAULT_CONFIG, ConfigOption, EnvArgument
from fabula.cli.runtime import open_env
from fabula.db.backup import backup, list_backups, restore
from fabula.db.console import psql_session
from fabula.db.copy import copy_database, load_runtime
from fabula.db.failover import promote, reset_replicas
from fabula.db.status import db_status
from fabula.output import Output


def _lag(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def print_status(out: Output, report: dict) -> None:
    table = Table(title=f"databases of {report['environment']} "
                        f"({'synchronous' if report['synchronous'] else 'asynchronous'} replication)")
    for column in ("server", "role", "address", "up", "timeline", "WAL", "state", "sync", "lag bytes",
                   "replay lag", "measured lag"):
        table.add_column(column)
    for s in report["servers"]:
        replica = s["role"] == "db-replica"
        table.add_row(s["name"], s["role"] + (" (to rebuild)" if s.get("rebuild") else ""), s["address"],
                      "[green]yes[/]" if s.get("up") else "[red]no[/]", str(s.get("timeline", "-")),
                      s.get("wal_lsn", "-"), s.get("state", "") if replica else "",
                      (s.get("sync_state") or "-") if replica else "",
                      str(s.get("lag_bytes", "-")) if replica else "",
                      _lag(s.get("replay_lag_s")) if replica else "",
                      _lag(s.get("heartbeat_lag_s")) if replica else "")
    out.console.print(table)


def register(app: typer.Typer) -> None:
    db_app = typer.Typer(help="Database operations: status, promote, reset-replicas, backups, copy.",
                         no_args_is_help=True)
    app.add_typer(db_app, name="db")

    @db_app.command("status")
    def status(cli: typer.Context, env: EnvArgument, config: ConfigOption = DEFAULT_CONFIG,
               as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """Each database server's role, timeline, WAL position; each replica's state and lag."""
        ctx = open_env(cli, config, env)
        out, report = ctx.out, db_status(ctx)
        out.json(report) if as_json else print_status(out, report)

    @db_app.command("promote")
    def promote_(cli: typer.Context, env: EnvArgument, config: ConfigOption = DEFAULT_CONFIG,
                 replica: Annotated[str | None, typer.Option("--replica", help="which replica")] = None) -> None:
        """Make a replica the primary: fence the old primary, promote, repoint every PgBouncer."""
        ctx = open_env(cli, config, env)
        out = ctx.out
        ctx.provider.check_prerequisites()
        load_runtime(ctx)
        result = promote(ctx, replica)
        out.console.print(f"{result['new_primary']} is the primary; {result['old_primary']} is fenced "
                          f"until `fabula db reset-replicas {env}`")

    @db_app.command("psql", context_settings={"allow_interspersed_args": False})
    def psql_(cli: typer.Context, env: EnvArgument,
              server: Annotated[str | None, typer.Argument(help="database server (default: the primary)")] = None,
              args: Annotated[list[str] | None, typer.Argument(help="psql's own arguments, after --")] = None,
              config: ConfigOption = DEFAULT_CONFIG) -> None:
        """psql in the app's database as PostgreSQL's superuser, e.g. `fabula db psql ENV -- -c 'SELECT 1'`."""
        ctx = open_env(cli, config, env)
        if server == "--":  # `fabula db psql ENV -- -c ...`: no server given
            server, args = None, list(args or [])
        rest = list(args or [])
        if rest and rest[0] == "--":
            rest = rest[1:]
        host, argv = psql_session(ctx, server, rest)
        raise typer.Exit(host.interactive(argv, user=host.accounts.db))

    @db_app.command("reset-replicas")
    def reset(cli: typer.Context, env: EnvArgument, config: ConfigOption = DEFAULT_CONFIG) -> None:
        """Rebuild the replicas from the current primary."""
        ctx = open_env(cli, config, env)
        out = ctx.out
        ctx.provider.check_prerequisites()
        load_runtime(ctx)
        reset_replicas(ctx)
        print_status(out, db_status(ctx))

    @db_app.command("backup")
    def backup_(cli: typer.Context, env: EnvArgument, config: ConfigOption = DEFAULT_CONFIG,
                to: Annotated[Path | None, typer.Option("--to", help="file or folder of this machine")] = None) -> None:
        """Back up the app's database (pg_dump custom format, from the primary)."""
        ctx = open_env(cli, config, env)
        out = ctx.out
        ctx.provider.check_prerequisites()
        out.console.print(str(backup(ctx, to)))

    @db_app.command("backups")
    def backups(cli: typer.Context, env: EnvArgument, config: ConfigOption = DEFAULT_CONFIG,
                as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """List the environment's backups."""
        ctx = open_env(cli, config, env)
        out, found = ctx.out, list_backups(ctx)
        if as_json:
            out.json(found)
            return
        table = Table(title=f"backups of {env}")
        for column in ("file", "created", "size", "release"):
            table.add_column(column)
        for b in found:
            table.add_row(b["path"], b.get("created", "?"), f"{b['size'] // 1024} KiB", b.get("release") or "-")
        out.console.print(table)

    @db_app.command("restore")
    def restore_(cli: typer.Context,
                 env: EnvArgument,
                 backup_file: Annotated[str, typer.Argument(help=(
                     "a backup file; where the environment keeps its backups on a host (db.backups_host), "
                     "a backup's name as `fabula db backups` lists it (./NAME for a file here)"),
                     metavar="FILE|NAME")],
                 config: ConfigOption = DEFAULT_CONFIG,
                 force: Annotated[bool, typer.Option("--force",
                                                     help="restore another database's backup")] = False) -> None:
        """Restore a backup as the app's database, under maintenance mode."""
        ctx = open_env(cli, config, env)
        out = ctx.out
        ctx.provider.check_prerequisites()
        kept = restore(ctx, backup_file, force=force)
        out.console.print(f"restored {backup_file}; the previous database is kept as {kept}")

    @db_app.command("copy")
    def copy(cli: typer.Context, source: Annotated[str, typer.Argument(help="environment to copy from")],
             target: Annotated[str, typer.Argument(help="environment to copy into")],
             config: ConfigOption = DEFAULT_CONFIG,
             force: Annotated[bool, typer.Option("--force", help="allow a production target")] = False) -> None:
        """Copy SOURCE's database into TARGET, then run TARGET's migrations."""
        source_ctx, target_ctx = open_env(cli, config, source), open_env(cli, config, target)
        out = target_ctx.out
        source_ctx.provider.check_prerequisites()
        kept = copy_database(source_ctx, target_ctx, force=force)
        out.console.print(f"{target} now has {source}'s data; its previous database is kept as {kept}")
