"""The autoscaler's policy, with no I/O: the group's settings as the policy sees them, the
decision (target tracking with cooldowns), the demand meter and the health tracker.

Everything here is a function of its arguments (a context is only read), so that the policy is
tested without a running environment (tests/unit/test_autoscaling.py).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from fabula.config import AutoscalingConfig, EnvironmentConfig
from fabula.context import Context
from fabula.errors import ConfigError, FabulaError
from fabula.state import EnvState

PROCESSES = ("scaling", "healing")  # what `fabula autoscaling suspend|resume` suspends
SCALE_OUT, SCALE_IN, HOLD = "scale-out", "scale-in", "hold"
# a web server that has never passed its health check since the autoscaler started watching it
# (e.g. left half-launched by a crashed command) is replaced only after this long
LAUNCH_GRACE = 120.0


def fmt(value: float) -> str:
    """A number as the reasons (and the CLI) show it: 4, 4.5."""
    return f"{value:.1f}" if value != int(value) else f"{int(value)}"


def unit(metric: str) -> str:
    return "sessions" if metric == "sessions" else "requests/s"


# -- the group's settings ----------------------------------------------------------------------

def group_config(ctx: Context) -> AutoscalingConfig:
    return ctx.env.web_group()


@dataclass(frozen=True)
class Bounds:
    """The group's settings that fabula.yml may leave out: the configuration's validation fills
    them (EnvironmentConfig._web_group; web_group() without an `autoscaling` section)."""
    desired: int
    max: int
    target: float


def bounds(group: AutoscalingConfig) -> Bounds:
    if group.desired is None or group.max is None or group.target is None:
        raise FabulaError(f"the web group's desired, max or target is unset (desired={group.desired}, "
                          f"max={group.max}, target={group.target}): internal error, the configuration's "
                          "validation fills them")
    return Bounds(group.desired, group.max, group.target)


def clamp(value: int, group: AutoscalingConfig) -> int:
    return max(group.min, min(bounds(group).max, value))


def desired_for_create(env: EnvironmentConfig, state: EnvState) -> int:
    """The web group's desired count that `create` converges to: the group's current one (set by
    `fabula scale` or the autoscaler), unless `autoscaling.desired` (or servers.web) changed in
    fabula.yml since create last applied it; always within min..max."""
    group = env.web_group()
    configured = bounds(group).desired
    if state.web_desired is None or state.web_desired_config != configured:
        return configured
    return clamp(state.web_desired, group)


def current_desired(ctx: Context) -> int:
    group = group_config(ctx)
    if ctx.state.web_desired is None:
        return clamp(len(ctx.state.by_role("web")) or bounds(group).desired, group)
    return ctx.state.web_desired


def check_desired(ctx: Context, desired: int) -> None:
    group = group_config(ctx)
    top = bounds(group).max
    if not group.min <= desired <= top:
        if ctx.env.fixed_inventory:
            raise ConfigError(f"the web group of {ctx.env_name} is its fixed inventory ({group.min} web host(s) "
                              f"under `hosts:`, provider {ctx.env.provider}): fabula cannot make or remove hosts, "
                              f"so desired {desired} is not possible",
                              f"add or remove web hosts under environments.{ctx.env_name}.hosts in "
                              f"{ctx.config.path} and run `fabula create {ctx.env_name}`")
        if ctx.env.autoscaling is None:
            raise ConfigError(f"the web group of {ctx.env_name} is fixed at {group.min} (servers.web, and no "
                              f"`autoscaling` section), so desired {desired} is outside its min..max",
                              f"give environments.{ctx.env_name} an `autoscaling: {{min: .., max: ..}}` in "
                              f"{ctx.config.path} and run `fabula create {ctx.env_name}`")
        raise ConfigError(f"desired {desired} is outside the web group's min..max ({group.min}..{top})",
                          f"choose {group.min}..{top}, or change environments.{ctx.env_name}.autoscaling "
                          f"in {ctx.config.path}")


# -- the decision ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    action: str        # scale-out, scale-in or hold
    desired: int       # the desired count after the decision
    reason: str
    blocked: str | None = None   # for a hold: what prevents a wanted change (cooldown, max...)


def decide(group: AutoscalingConfig, desired: int, in_service: int, demand: float | None, now: float,
           last_scale_out: float | None = None, last_change: float | None = None) -> Decision:
    """Target tracking: what the desired count should be for `demand` (the group's total: sessions
    in progress, or requests per second) so that each in-service server has about `target`.

    Scale out (at once to as many servers as the demand needs, up to max) when the demand per
    in-service server is above target, unless a scale-out happened less than scale_out_cooldown
    ago. Scale in by one (down to min) when one server fewer would still be below target, unless
    the group changed (in either direction, or by `fabula scale`) less than scale_in_cooldown
    ago. Times are seconds on one clock; None means never."""
    per = unit(group.metric)
    limits = bounds(group)
    top, target = limits.max, limits.target
    if desired < group.min:
        return Decision(SCALE_OUT, group.min, f"desired {desired} is below min {group.min}")
    if desired > top:
        return Decision(SCALE_IN, top, f"desired {desired} is above max {top}")
    if demand is None:
        return Decision(HOLD, desired, "no demand measured yet")
    if in_service < desired:
        return Decision(HOLD, desired, f"{in_service} of {desired} web servers in service: waiting for the "
                                       "others before judging the demand", blocked="pending")
    per_server = demand / in_service
    measured = f"{fmt(round(per_server, 1))} {per} per server ({fmt(round(demand, 1))} on {in_service})"
    if per_server > target:
        if desired >= top:
            return Decision(HOLD, desired, f"{measured} is above the target {fmt(target)}, but the "
                                           f"group is at max {top}", blocked="max")
        wanted = min(top, max(desired + 1, math.ceil(demand / target)))
        if last_scale_out is not None and now - last_scale_out < group.scale_out_cooldown:
            left = group.scale_out_cooldown - (now - last_scale_out)
            return Decision(HOLD, desired, f"{measured} is above the target {fmt(target)}: scale-out "
                                           f"to {wanted} waits for its cooldown ({left:.0f}s left)",
                            blocked="scale-out cooldown")
        return Decision(SCALE_OUT, wanted, f"{measured} is above the target {fmt(target)}: "
                                           f"{wanted} servers keep it within target")
    if desired > group.min and in_service > 1 and demand / (in_service - 1) < target:
        fewer = demand / (in_service - 1)
        reason = (f"{measured}: {in_service - 1} server(s) would have {fmt(round(fewer, 1))} each, "
                  f"below the target {fmt(target)}")
        if last_change is not None and now - last_change < group.scale_in_cooldown:
            left = group.scale_in_cooldown - (now - last_change)
            return Decision(HOLD, desired, f"{reason}: scale-in waits for its cooldown ({left:.0f}s left)",
                            blocked="scale-in cooldown")
        return Decision(SCALE_IN, desired - 1, reason)
    return Decision(HOLD, desired, f"{measured}: within the target {fmt(target)}")


# -- measuring the demand ----------------------------------------------------------------------

class DemandMeter:
    """The group's demand from the load balancer's per-server counters, averaged over `window`
    seconds: `sessions` is the mean of the sessions in progress (and queued) summed over the web
    servers; `requests` the requests per second, from each server's request counter (HAProxy's
    stot: one per request). A server seen for the first time counts from then on. The counters
    start again from 0 when HAProxy reloads (a server joins or leaves): the autoscaler starts a
    new meter after each change, and a meter that sees a counter go back starts afresh.
    No value until the samples span half the window: one sample is too noisy to act on."""

    def __init__(self, metric: str, window: float):
        self.metric, self.window = metric, window
        self.samples: deque[tuple[float, float, float]] = deque()   # (from, to, value)
        self.counts: dict[str, int] = {}
        self.started: float | None = None
        self.last: float | None = None

    def add(self, now: float, stats: dict[str, dict[str, str]], members: set[str] | None = None) -> None:
        rows = {n: r for n, r in stats.items() if members is None or n in members}
        if self.started is None:
            self.started = now
        if self.metric == "sessions":
            value = float(sum(_int(r.get("scur")) + _int(r.get("qcur")) for r in rows.values()))
            self.samples.append((now, now, value))
        else:
            counts = {n: _int(r.get("stot")) for n, r in rows.items()}
            if any(c < self.counts.get(n, 0) for n, c in counts.items()):
                self.samples.clear()  # HAProxy reloaded: its counters started again
                self.started = now
            elif self.last is not None:
                served = sum(c - self.counts.get(n, c) for n, c in counts.items())
                self.samples.append((self.last, now, float(served)))
            self.counts, self.last = counts, now
        while self.samples and self.samples[0][1] < now - self.window:
            self.samples.popleft()

    def value(self) -> float | None:
        """The group's demand: mean sessions, or requests per second; None until measured."""
        if not self.samples or self.started is None or self.samples[-1][1] - self.started < self.window / 2:
            return None
        if self.metric == "sessions":
            return sum(v for _, _, v in self.samples) / len(self.samples)
        span = self.samples[-1][1] - self.samples[0][0]
        return sum(v for _, _, v in self.samples) / span if span > 0 else None


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def live_demand(metric: str, stats: dict[str, dict[str, str]]) -> float:
    """The demand right now from HAProxy's own counters (sessions in progress, or the requests of
    the last second), for `describe` when the autoscaler has not measured it lately."""
    if metric == "sessions":
        return float(sum(_int(r.get("scur")) + _int(r.get("qcur")) for r in stats.values()))
    return float(sum(_int(r.get("rate")) for r in stats.values()))


# -- health ------------------------------------------------------------------------------------

def in_service(status: str | None) -> bool:
    """Taking traffic: UP, or UP and failing checks but not yet out ("UP 1/2")."""
    return status is not None and status.startswith("UP")


def failing(status: str | None) -> bool:
    """Out of service against the operator's will: DOWN (or going up again), or not in the load
    balancer at all. MAINT, DRAIN and NOLB are someone's decision, not a failure."""
    return status is None or status.startswith("DOWN")


@dataclass
class HealthTracker:
    """When each web server was last seen in service and since when it is failing."""

    seen_up: set[str] = field(default_factory=set)
    failing_since: dict[str, float] = field(default_factory=dict)

    def observe(self, now: float, members: list[str], health: dict[str, str]) -> None:
        for name in members:
            status = health.get(name)
            if status == "UP":
                self.seen_up.add(name)
            if failing(status):
                self.failing_since.setdefault(name, now)
            else:
                self.failing_since.pop(name, None)
        for name in set(self.failing_since) - set(members):
            self.failing_since.pop(name)
        self.seen_up &= set(members)

    def pause(self) -> None:
        """Someone else changes the group (a deploy holds the lock): failures are counted afresh
        once it is done, so a server it is still bringing up is not taken for a dead one."""
        self.failing_since.clear()

    def unhealthy(self, now: float, grace: float, launch_grace: float = LAUNCH_GRACE) -> list[tuple[str, str]]:
        """(server, reason) for each server to replace."""
        found = []
        for name, since in sorted(self.failing_since.items()):
            failed_for = now - since
            if name in self.seen_up and failed_for > grace:
                found.append((name, f"{name} failed its health check for {failed_for:.0f}s after being in "
                                    f"service (health_grace {fmt(grace)}s)"))
            elif name not in self.seen_up and failed_for > max(launch_grace, grace):
                found.append((name, f"{name} has not passed its health check in {failed_for:.0f}s"))
        return found
