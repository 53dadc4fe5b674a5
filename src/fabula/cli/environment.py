"""`fabula create`, `describe`, `destroy`, `maintenance`, `exec`, `logs`: the environment as a whole."""
from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from fabula.cli.deploy import lock_line
from fabula.cli.options import DEFAULT_CONFIG, ConfigOption, EnvArgument
from fabula.cli.runtime import cli_environment, open_env
from fabula.cli.scaling import describe_lines
from fabula.errors import FabulaError
from fabula.operations.create import create as create_environment
from fabula.operations.describe import describe as describe_environment
from fabula.operations.destroy import destroy as destroy_environment
from fabula.operations.logs import log_sources, show_logs
from fabula.operations.maintenance import switch as switch_maintenance
from fabula.output import Output


def _status_style(value: str | None) -> str:
    styles = {"up": "green", "UP": "green", "running": "green", "degraded": "yellow", "DOWN": "red",
              "missing": "red", "stopped": "red"}
    return f"[{styles.get(value or '', 'red')}]{value}[/]" if value else "-"


def print_table(out: Output, report: dict) -> None:
    table = Table(title=f"{report['project']} / {report['environment']}  (release {report['release'] or '-'})")
    for column in ("server", "role", "address", "state", "services", "release", "lb health"):
        table.add_column(column)
    for s in report["servers"]:
        services = " ".join(f"[green]{name}[/]" if state == "up" else f"[red]{name}({state})[/]"
                            for name, state in s["services"].items())
        if s.get("replication"):
            r = s["replication"]
            lag = f", lag {r['lag_bytes']} B" if r["lag_bytes"] is not None else ""
            services += f" ({r['state']} {r['sync_state'] or ''}{lag})"
        table.add_row(s["name"], s["role"] + (" (warm)" if s.get("warm") else ""), s["address"],
                      _status_style(s["state"]), services, s["release"] or "-",
                      _status_style(s["lb"]) if s["role"] == "web" and not s.get("warm") else "")
    out.console.print(table)
    lb = report["load_balancer"]
    running = "[green]running[/]" if lb["running"] else "[red]not running[/]"
    out.console.print(f"load balancer: {running}   url: [bold]{report['url']}[/bold]")
    if report.get("lock"):
        out.console.print(lock_line(report["lock"]))
    if report.get("autoscaling"):
        for line in describe_lines(report["autoscaling"]):
            out.console.print(line, markup=False, highlight=False)


def require_server(ctx, server: str) -> str:
    if server not in ctx.state.servers:
        known = ", ".join(sorted(ctx.state.servers)) or "none (run `fabula create` first)"
        raise FabulaError(f"environment {ctx.env_name} has no server {server!r}", f"servers: {known}")
    return server


def register(app: typer.Typer) -> None:
    @app.command()
    def create(cli: typer.Context, env: EnvArgument, config: ConfigOption = DEFAULT_CONFIG) -> None:
        """Create ENV (or converge it to fabula.yml): servers, services, release, load balancer."""
        ctx = open_env(cli, config, env)
        out = ctx.out
        create_environment(ctx)
        print_table(out, describe_environment(ctx))


    @app.command()
    def describe(cli: typer.Context, env: EnvArgument, config: ConfigOption = DEFAULT_CONFIG,
                 as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
        """Show ENV's servers, their services, release and load-balancer health."""
        ctx = open_env(cli, config, env)
        out = ctx.out
        report = describe_environment(ctx)
        if as_json:
            out.json(report)
        elif not report["exists"]:
            out.console.print(f"environment {env} does not exist: `fabula create {env}` creates it")
        else:
            print_table(out, report)


    @app.command()
    def destroy(cli: typer.Context, env: EnvArgument, config: ConfigOption = DEFAULT_CONFIG,
                yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
                force: Annotated[bool, typer.Option(
                    "--force", help="break the lock of another command still running on ENV")] = False) -> None:
        """Remove everything ENV made: processes, namespaces, links, firewall, data, secrets."""
        ctx = open_env(cli, config, env)
        out = ctx.out
        if not yes:
            if not cli_environment(cli).stdin_isatty:
                raise FabulaError(f"destroy removes {env}'s data and cannot be undone", "pass --yes to confirm")
            typer.confirm(f"Destroy {ctx.project}/{env} and all its data?", abort=True)
        destroy_environment(ctx, force=force)
        out.console.print(f"environment {env} destroyed")


    @app.command()
    def trust(cli: typer.Context, env: EnvArgument, config: ConfigOption = DEFAULT_CONFIG) -> None:
        """Record the host keys of ENV's servers (provider ssh) in its known_hosts file: compare the
        fingerprints printed with the hosts' own (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`)."""
        ctx = open_env(cli, config, env, shared=False)   # nothing can be fetched from unknown hosts
        for line in ctx.provider.trust_host_keys():
            ctx.out.console.print(line, highlight=False)


    @app.command()
    def maintenance(cli: typer.Context, env: EnvArgument, state: Annotated[str, typer.Argument(help="on or off")],
                    config: ConfigOption = DEFAULT_CONFIG) -> None:
        """Turn maintenance mode on (every web server answers 503 with the maintenance page) or off."""
        if state not in ("on", "off"):
            raise FabulaError(f"maintenance takes `on` or `off`, not {state!r}")
        ctx = open_env(cli, config, env)
        switch_maintenance(ctx, state == "on")


    @app.command(name="exec", context_settings={"allow_interspersed_args": False})
    def exec_(cli: typer.Context,
              env: EnvArgument, server: Annotated[str, typer.Argument(help="server name, e.g. web1")],
              command: Annotated[list[str], typer.Argument(help="command to run, after --")],
              config: ConfigOption = DEFAULT_CONFIG) -> None:
        """Run a command on one server of ENV (as root), e.g. `fabula exec testing db1 -- ps aux`."""
        ctx = open_env(cli, config, env)
        require_server(ctx, server)
        if command and command[0] == "--":
            command = command[1:]
        raise typer.Exit(ctx.host(server).interactive(command))


    @app.command()
    def logs(cli: typer.Context,
             env: EnvArgument, server: Annotated[str | None, typer.Argument(help="server name")] = None,
             service: Annotated[str | None, typer.Argument(help="service, e.g. gunicorn")] = None,
             config: ConfigOption = DEFAULT_CONFIG,
             follow: Annotated[bool, typer.Option("-f", "--follow")] = False,
             lines: Annotated[int, typer.Option("-n", "--lines")] = 50) -> None:
        """Show the logs of ENV's services (all servers, one server, or one service)."""
        ctx = open_env(cli, config, env)
        raise typer.Exit(show_logs(log_sources(ctx, server, service), lines, follow))
