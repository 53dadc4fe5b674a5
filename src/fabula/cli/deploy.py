"""`fabula deploy`, `rollback`, `manage`, `release ...`, `history`, `unlock`: releases, deploys and the
record of operations."""
from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fabula.cli.options import DEFAULT_CONFIG, ConfigOption, EnvArgument, JsonOption
from fabula.cli.runtime import open_env
from fabula.db.copy import load_runtime
from fabula.deploy import releases, rollout
from fabula.deploy.rollout import plan_report
from fabula.environment import audit
from fabula.environment import history as history_file
from fabula.errors import ConfigError as BadInput
from fabula.output import Output
from fabula.roles import appserver

OUTCOME_STYLES = {"ok": "green", "failed": "red", "interrupted": "yellow"}


def lock_line(lock: dict) -> str:
    """The line `fabula describe` prints while the environment is locked."""
    if "unreadable" in lock:
        return f"[red]locked[/]: unreadable lock file ({escape(lock['unreadable'])})"
    stale = " [yellow](stale: its process has ended; the next command takes it over)[/]" if lock["stale"] else ""
    return (f"[yellow]locked[/] by {escape(lock['owner'])} (pid {lock['pid']}, since {lock['started']}): "
            f"`{escape(lock['command'])}`{stale}")


def _short_time(iso: str | None) -> str:
    return iso.replace("T", " ")[:19] if iso else "-"


def _details(record: dict) -> str:
    details = dict(record.get("details") or {})
    parts = []
    if "from_release" in details or "to_release" in details:
        parts.append(f"{details.pop('from_release', None) or '-'} -> {details.pop('to_release', None) or '-'}")
    parts += [f"{key}={value}" for key, value in details.items() if not isinstance(value, (dict, list))]
    text = escape(" ".join(parts))
    if record.get("error"):
        text += ("\n" if text else "") + f"[red]{escape(record['error'].splitlines()[0])}[/]"
    return text


def history_table(title: str, records: list[dict]) -> Table:
    table = Table(title=title)
    for column in ("started", "who", "command", "outcome", "took", "phases", "details"):
        table.add_column(column)
    for r in records:
        outcome = r.get("outcome") or "?"
        took = f"{r['seconds']:.1f}s" if isinstance(r.get("seconds"), (int, float)) else "-"
        phases = ", ".join(f"{p['name']} {p['seconds']:.1f}s"
                           + ("" if p.get("outcome") == "ok" else f" ({p.get('outcome')})")
                           for p in r.get("phases") or [])
        table.add_row(_short_time(r.get("started")), escape(r.get("who") or "?"), escape(r.get("command") or ""),
                      f"[{OUTCOME_STYLES.get(outcome, 'red')}]{outcome}[/]", took, escape(phases), _details(r))
    return table


def releases_table(report: dict) -> Table:
    table = Table(title=f"{report['project']} / {report['environment']} releases "
                        f"(group uses {report['group_release'] or '-'})")
    for column in ("release", "commit", "built at", "build", "built on", "group", "servers"):
        table.add_column(column)
    for r in report["releases"]:
        built = f"{r['build_seconds']:.1f}s" if r["build_seconds"] is not None else "-"
        when = _short_time(r["built_at"]) if r["built"] else "[red]not on disk[/]"
        table.add_row(r["id"], r["commit"] or "-", when, built, r["built_on"] or "-",
                      "[green]yes[/]" if r["group"] else "", " ".join(r["servers"]))
    return table


def print_plan(out: Output, plan: dict) -> None:
    out.console.print(f"[bold]{plan['strategy']}[/] deploy of release {plan['to_release']} "
                      f"(now {plan['from_release']}): {plan['reason']}")
    for migration in plan["migrations"]:
        out.console.print(f"  migration {migration['migration']}")
        for op in migration["operations"]:
            mark = "[green]additive[/]" if op["additive"] else f"[red]not additive[/]: {op['why']}"
            out.console.print(f"    {op['description']}: {mark}")
    if not plan["migrations"]:
        out.console.print("  no migrations to run")
    out.console.print(f"  web servers to replace: {', '.join(plan['replace'])}; worker: {plan['worker'] or '-'}")


def register(app: typer.Typer) -> None:
    @app.command()
    def deploy(cli: typer.Context, env: EnvArgument, config: ConfigOption = DEFAULT_CONFIG,
               rev: Annotated[str | None, typer.Option("--rev", help="git revision (default HEAD)")] = None,
               serial: Annotated[bool, typer.Option("--serial", help="replace web servers one at a time")] = False,
               full: Annotated[bool, typer.Option("--full", help="upgrade page, then swap all servers")] = False,
               plan: Annotated[bool, typer.Option("--plan", help="show what would happen; change nothing")] = False,
               as_json: JsonOption = False) -> None:
        """Deploy a revision: serial or full, chosen from its migrations unless given."""
        if serial and full:
            raise BadInput("choose one of --serial and --full")
        ctx = open_env(cli, config, env)
        out = ctx.out
        ctx.provider.check_prerequisites()
        load_runtime(ctx)
        result = plan_report(rollout.deploy(ctx, rev, "serial" if serial else "full" if full else None,
                                            plan_only=plan))
        if as_json:
            out.json(result)
        elif plan:
            print_plan(out, result)

    @app.command()
    def rollback(cli: typer.Context, env: EnvArgument, config: ConfigOption = DEFAULT_CONFIG) -> None:
        """Serial deploy of the previous release."""
        ctx = open_env(cli, config, env)
        ctx.provider.check_prerequisites()
        load_runtime(ctx)
        rollout.rollback(ctx)

    @app.command(context_settings={"allow_interspersed_args": False})
    def manage(cli: typer.Context,
               env: EnvArgument, args: Annotated[list[str], typer.Argument(help="manage.py arguments, after --")],
               config: ConfigOption = DEFAULT_CONFIG) -> None:
        """Run manage.py on the worker (or a web server), with the app's settings; output streamed."""
        ctx = open_env(cli, config, env)
        load_runtime(ctx)
        args = args[1:] if args and args[0] == "--" else args
        # manage.py changes the environment (migrations, data): under the lock, recorded
        with audit.operation(ctx, "manage") as op:
            host = rollout.migration_host(ctx)
            op.details["server"] = host.name
            status = host.interactive(appserver.manage_argv(ctx, host, *args), user=host.accounts.app,
                                      env=appserver.app_environment(ctx, host))
            op.details["exit_status"] = status
            if status != 0:
                op.fail(f"manage.py exited with {status}")
        raise typer.Exit(status)

    release_app = typer.Typer(help="Releases (launch configurations): one immutable build per git revision.",
                              no_args_is_help=True)
    app.add_typer(release_app, name="release")

    @release_app.command("build")
    def release_build(cli: typer.Context, env: EnvArgument, config: ConfigOption = DEFAULT_CONFIG,
                      rev: Annotated[str, typer.Option("--rev", help="git revision of app.source")] = "HEAD",
                      ) -> None:
        """Build the release of a git revision (or reuse it if built before); no server changes."""
        ctx = open_env(cli, config, env)
        out = ctx.out
        built, reused = releases.build_release(ctx, rev)
        state = "already built" if reused else "built"
        out.console.print(f"release {built.id} (commit {built.commit}) {state}: {built.path}", highlight=False)

    @release_app.command("list")
    def release_list(cli: typer.Context,
                     env: EnvArgument, config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False) -> None:
        """Every built release of ENV, the one its web group uses and which servers run which."""
        ctx = open_env(cli, config, env)
        out = ctx.out
        report = releases.releases_report(ctx)
        if as_json:
            out.json(report)
        elif not report["releases"]:
            out.console.print(f"no releases built for {env}: `fabula release build {env}` builds one")
        else:
            out.console.print(releases_table(report))

    @app.command()
    def history(cli: typer.Context,
                env: EnvArgument, config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False,
                last: Annotated[int, typer.Option("-n", "--last", min=1, help="show the last N operations")] = 20,
                ) -> None:
        """The operations run on ENV (who, when, phases, outcome), newest last."""
        ctx = open_env(cli, config, env)
        out = ctx.out
        records, unreadable = history_file.read(ctx.paths)
        if unreadable:
            out.warn(f"{unreadable} unreadable line(s) in {history_file.history_path(ctx.paths)} skipped")
        records = records[-last:]
        if as_json:
            out.json(records)
        elif not records:
            out.console.print(f"no operations recorded for {env}")
        else:
            out.console.print(history_table(f"{ctx.project} / {env} history", records))

    @app.command()
    def unlock(cli: typer.Context, env: EnvArgument, config: ConfigOption = DEFAULT_CONFIG) -> None:
        """Break ENV's lock, e.g. after a command was killed on another host."""
        ctx = open_env(cli, config, env)
        out = ctx.out
        holder, existed = audit.unlock(ctx)
        if not existed:
            out.console.print(f"environment {env} is not locked")
            return
        if holder is None:
            out.console.print(f"broke the lock of environment {env} (its lock file was unreadable)")
            return
        out.console.print(f"broke the lock of environment {env} held by {escape(holder.describe())}",
                          highlight=False)
        if holder.on_this_host() and not holder.is_stale():
            out.warn(f"pid {holder.pid} is still running: it may still be changing {env}")

