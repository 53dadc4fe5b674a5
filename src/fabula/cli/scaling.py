"""`fabula scale`, `fabula autoscaling`, and the autoscaler program itself (hidden): the web
group's desired count, suspending and resuming the autoscaler, and its decisions; the web group
as text (under `fabula describe`'s table, and the decisions)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fabula.autoscaling.actions import set_suspended
from fabula.autoscaling.group import set_desired
from fabula.autoscaling.log import decisions_path, read_decisions
from fabula.autoscaling.policy import check_desired, fmt, unit
from fabula.cli.options import DEFAULT_CONFIG, ConfigOption, EnvArgument
from fabula.cli.runtime import open_env
from fabula.errors import ConfigError


def describe_lines(report: dict) -> list[str]:
    """The web group (autoscaling.report's group_report) as plain lines under `describe`'s table."""
    per = unit(report["metric"])
    demand = report["demand"]
    if demand["per_server"] is not None:
        now = f"{fmt(demand['per_server'])} {per} per server ({fmt(demand['total'])} in all)"
    elif demand["total"] is not None:
        now = f"{fmt(demand['total'])} {per} in all"
    else:
        now = "not measured"
    kind = ("autoscaling" if report["configured"] else
            "a fixed inventory (the web hosts of `hosts:`)" if report.get("fixed_inventory") else
            "fixed (no `autoscaling` in fabula.yml; self-healing only)")
    target = f"target {fmt(report['target'])} {per} per server; " if report["configured"] else ""
    lines = [f"web group: {report['in_service']} in service, desired {report['desired']} "
             f"(min {report['min']}, max {report['max']}), {kind}",
             f"  {target}demand now {now}; autoscaler {report['controller']}; "
             f"suspended: {', '.join(report['suspended']) or 'none'}"]
    warm = report.get("warm") or {"wanted": 0, "servers": []}
    if warm["wanted"] or warm["servers"]:
        lines.append(f"  warm pool: {len(warm['servers'])} of {warm['wanted']} "
                     f"({', '.join(warm['servers']) or 'none yet'}), out of the load balancer until taken")
    lines += platform_group_lines(report.get("platform_group"))
    for entry in report["decisions"]:
        lines.append("  " + decision_line(entry))
    return lines


def platform_group_lines(group: dict | None) -> list[str]:
    """The platform's own group (an Auto Scaling group) in its words, under the web group's lines."""
    if group is None:
        return []
    if not group["exists"]:
        return [f"  platform group {group['name']}: not made yet (`fabula create` makes it)"]
    lines = [f"  platform group {group['name']}: desired {group['desired']} (min {group['min']}, max {group['max']}), "
             f"release {group['release'] or 'none'}; {group['scaling'] or 'no scaling policy'}; "
             f"suspended: {', '.join(group['suspended']) or 'none'}"]
    for member in group["instances"]:
        lines.append(f"    {member['name']}: {member['lifecycle']}, {member['health']}, target "
                     f"{member['target'] or 'not registered'}, release {member['release'] or '?'}")
    return lines


def decision_line(entry: dict) -> str:
    """One entry of the decisions log as a line."""
    when = (entry.get("time") or "").replace("T", " ")[:19]
    action = entry.get("action", "?")
    change = f" {entry['from']} -> {entry['to']}" if "from" in entry and "to" in entry else ""
    outcome = entry.get("outcome")
    took = f", {entry['seconds']:.1f}s" if isinstance(entry.get("seconds"), (int, float)) else ""
    servers = "".join(f" {label} {', '.join(entry[key])}" for key, label in (("retired", "-"), ("launched", "+"))
                      if entry.get(key))
    tail = f" [{outcome}{took}]" if outcome else ""
    error = f": {entry['error']}" if entry.get("error") else ""
    return f"{when} {action}{change}{servers}: {entry.get('reason', '')}{tail}{error}"


def register(app: typer.Typer) -> None:
    @app.command()
    def scale(cli: typer.Context, env: EnvArgument,
              desired: Annotated[int, typer.Option("--desired", help="web servers the group should have")],
              config: ConfigOption = DEFAULT_CONFIG,
              as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
        """Set the web group's desired count (within min..max) and launch or retire web servers now."""
        ctx = open_env(cli, config, env)
        out = ctx.out
        check_desired(ctx, desired)  # bad input: nothing is touched, not even the lock
        ctx.provider.check_prerequisites()
        result = set_desired(ctx, desired)
        if as_json:
            out.json(result)
            return
        changes = "".join(f"; {label} {', '.join(result[key])}" for key, label in
                          (("launched", "launched"), ("retired", "retired")) if result.get(key))
        out.console.print(f"web group of {env}: desired {result['from']} -> {result['to']}{changes or '; no change'}",
                          highlight=False)

    @app.command(name="autoscaling")
    def autoscaling_command(cli: typer.Context,
            env: EnvArgument,
            action: Annotated[str, typer.Argument(help="suspend, resume, or decisions (the autoscaler's log)")],
            config: ConfigOption = DEFAULT_CONFIG,
            process: Annotated[list[str] | None, typer.Option(
                "--process", "-p", help="only this process: scaling (demand) or healing (replacing "
                                        "failed servers, keeping the desired count); default both")] = None,
            last: Annotated[int, typer.Option("-n", "--last", min=1, help="decisions: how many")] = 20,
            as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
        """Suspend or resume the autoscaler's processes, or show its decisions."""
        ctx = open_env(cli, config, env)
        out = ctx.out
        if action in ("suspend", "resume"):
            if not ctx.paths.state_file.exists():
                raise ConfigError(f"environment {env} does not exist", f"`fabula create {env}` creates it")
            suspended = set_suspended(ctx, action == "suspend", process)
            if as_json:
                out.json({"suspended": suspended})
            else:
                out.console.print(f"autoscaling of {env}: suspended processes: {', '.join(suspended) or 'none'}",
                                  highlight=False)
        elif action == "decisions":
            entries = read_decisions(decisions_path(ctx.paths), last=last)
            if as_json:
                out.json(entries)
            elif not entries:
                out.console.print(f"no autoscaling decisions recorded for {env}")
            else:
                for entry in entries:
                    out.console.print(escape(decision_line(entry)), highlight=False)
        else:
            raise ConfigError(f"autoscaling takes suspend, resume or decisions, not {action!r}")

    @app.command(hidden=True)
    def autoscaler(cli: typer.Context, env: EnvArgument, config: ConfigOption = DEFAULT_CONFIG,
                   decisions: Annotated[Path | None, typer.Option(help="the decisions log")] = None) -> None:
        """The autoscaler itself: runs until stopped (`create` starts it under the platform's supervisor)."""
        from fabula.autoscaling.controller import Controller
        from fabula.program_home import CONTROLLER_HOME

        Controller(config.resolve(), env, decisions, shipped=CONTROLLER_HOME in os.environ).run()
