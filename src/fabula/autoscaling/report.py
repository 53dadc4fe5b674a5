"""The web group as `fabula describe` reports it (data only: cli/scaling.py renders it)."""
from __future__ import annotations

import time

from fabula.autoscaling.controller import controller_state
from fabula.autoscaling.log import decisions_path, read_decisions, read_status, status_path
from fabula.autoscaling.policy import current_desired, group_config, in_service, live_demand
from fabula.context import Context


def group_report(ctx: Context, health: dict[str, str], decisions: int = 5) -> dict:
    """The group's settings, members, demand (the autoscaler's last measurement if fresh, else the
    load balancer's own counters), suspended processes, the autoscaler's state and last decisions."""
    group = group_config(ctx)
    members = [r.name for r in ctx.state.by_role("web")]
    serving = [n for n in members if in_service(health.get(n))]
    status = read_status(status_path(ctx.paths))
    fresh = status is not None and time.time() - status.get("ts", 0) < max(3 * group.interval, 10)
    if status is not None and fresh and status.get("demand") is not None:
        demand, source = status["demand"], "autoscaler"
    else:
        stats = ctx.provider.load_balancer.stats() if health else {}
        demand = live_demand(group.metric, {n: r for n, r in stats.items() if n in members}) if stats else None
        source = "load balancer"
    per_server = round(demand / len(serving), 2) if demand is not None and serving else None
    native = ctx.provider.web_group(ctx)
    return {
        # the platform's own group (an Auto Scaling group), in its own words; None: fabula's
        "platform_group": native.report() if native is not None else None,
        "configured": ctx.env.autoscaling is not None,
        "fixed_inventory": ctx.env.fixed_inventory,
        "min": group.min, "desired": current_desired(ctx), "max": group.max,
        "metric": group.metric, "target": group.target,
        "scale_out_cooldown": group.scale_out_cooldown, "scale_in_cooldown": group.scale_in_cooldown,
        "health_grace": group.health_grace, "interval": group.interval,
        "servers": members, "in_service": len(serving),
        "warm": {"wanted": group.warm, "servers": [r.name for r in ctx.state.warm_pool()]},
        "demand": {"total": round(demand, 2) if demand is not None else None, "per_server": per_server,
                   "source": source},
        "suspended": list(ctx.state.autoscaling_suspended),
        "controller": ("not running" if not ctx.paths.state_file.exists() else
                        f"{controller_state(ctx)}, watching the hosts" if ctx.env.fixed_inventory else
                        f"{controller_state(ctx)}, converging what the platform's group launches"
                        if native is not None else controller_state(ctx)),
        # the last changes and held-back changes (rounds skipped under another command's lock are
        # only in `fabula autoscaling ENV decisions`: `lock` already says who holds it)
        "decisions": [d for d in read_decisions(decisions_path(ctx.paths)) if d.get("action") != "skip"][-decisions:],
    }
