"""The web tier as an autoscaling group (FabulAWS's autoscaling group, kept by fabula itself).

The group has a desired count of web servers within `autoscaling: {min, max}` of fabula.yml,
and a launch configuration: the group's release (`state.release`). `fabula scale` sets the
desired count; the autoscaler (deploy/controller.py, a long-running program of the environment)
changes it from the demand the load balancer measures, and replaces web servers that stop
passing their health check. Every change runs as an operation (the environment's lock and a
history record) and goes through the group primitives of deploy/group.py: a new server joins
the load balancer only once healthy, a leaving one is drained first.

This module holds the pieces that need no running environment to be tested (the decision, the
demand meter, the health tracker) and the group's changes themselves.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fabula import pki, release as releases, secrets
from fabula.config import AutoscalingConfig, EnvironmentConfig
from fabula.context import Context, Release
from fabula.environment import lock
from fabula.environment.audit import Operation, operation
from fabula.deploy.group import launch_web_server, retire_web_server
from fabula.errors import ConfigError, FabulaError
from fabula.providers.base import SYSTEM_PATH
from fabula.state import EnvPaths, EnvState
from fabula.supervisor import Program

PROGRAM = "autoscaler"
ACTION = "autoscale"              # the controller's operations, in the lock and the history
PROCESSES = ("scaling", "healing")
DECISIONS_FILE = "autoscaler.jsonl"
STATUS_FILE = "autoscaler.status.json"
# a web server that has never passed its health check since the autoscaler started watching it
# (e.g. left half-launched by a crashed command) is replaced only after this long
LAUNCH_GRACE = 120.0
# after a failed change the autoscaler waits before trying again: 15 s, 30 s, ... up to 10 min
BACKOFF_FIRST, BACKOFF_MAX = 15.0, 600.0

SCALE_OUT, SCALE_IN, HOLD = "scale-out", "scale-in", "hold"


# -- the group's settings ----------------------------------------------------------------------

def group_config(ctx: Context) -> AutoscalingConfig:
    return ctx.env.web_group()


def clamp(value: int, group: AutoscalingConfig) -> int:
    return max(group.min, min(group.max, value))


def desired_for_create(env: EnvironmentConfig, state: EnvState) -> int:
    """The web group's desired count that `create` converges to: the group's current one (set by
    `fabula scale` or the autoscaler), unless `autoscaling.desired` (or servers.web) changed in
    fabula.yml since create last applied it; always within min..max."""
    group = env.web_group()
    if state.web_desired is None or state.web_desired_config != group.desired:
        return group.desired
    return clamp(state.web_desired, group)


def current_desired(ctx: Context) -> int:
    group = group_config(ctx)
    if ctx.state.web_desired is None:
        return clamp(len(ctx.state.by_role("web")) or group.desired, group)
    return ctx.state.web_desired


def check_desired(ctx: Context, desired: int) -> None:
    group = group_config(ctx)
    if not group.min <= desired <= group.max:
        if ctx.env.autoscaling is None:
            raise ConfigError(f"the web group of {ctx.env_name} is fixed at {group.min} (servers.web, and no "
                              f"`autoscaling` section), so desired {desired} is outside its min..max",
                              f"give environments.{ctx.env_name} an `autoscaling: {{min: .., max: ..}}` in "
                              f"{ctx.config.path} and run `fabula create {ctx.env_name}`")
        raise ConfigError(f"desired {desired} is outside the web group's min..max ({group.min}..{group.max})",
                          f"choose {group.min}..{group.max}, or change environments.{ctx.env_name}.autoscaling "
                          f"in {ctx.config.path}")


# -- the decision ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    action: str        # scale-out, scale-in or hold
    desired: int       # the desired count after the decision
    reason: str
    blocked: str | None = None   # for a hold: what prevents a wanted change (cooldown, max...)


def _fmt(value: float) -> str:
    return f"{value:.1f}" if value != int(value) else f"{int(value)}"


def decide(group: AutoscalingConfig, desired: int, in_service: int, demand: float | None, now: float,
           last_scale_out: float | None = None, last_change: float | None = None) -> Decision:
    """Target tracking: what the desired count should be for `demand` (the group's total: sessions
    in progress, or requests per second) so that each in-service server has about `target`.

    Scale out (at once to as many servers as the demand needs, up to max) when the demand per
    in-service server is above target, unless a scale-out happened less than scale_out_cooldown
    ago. Scale in by one (down to min) when one server fewer would still be below target, unless
    the group changed (in either direction, or by `fabula scale`) less than scale_in_cooldown
    ago. Times are seconds on one clock; None means never."""
    unit = "sessions" if group.metric == "sessions" else "requests/s"
    if desired < group.min:
        return Decision(SCALE_OUT, group.min, f"desired {desired} is below min {group.min}")
    if desired > group.max:
        return Decision(SCALE_IN, group.max, f"desired {desired} is above max {group.max}")
    if demand is None:
        return Decision(HOLD, desired, "no demand measured yet")
    if in_service < desired:
        return Decision(HOLD, desired, f"{in_service} of {desired} web servers in service: waiting for the "
                                       "others before judging the demand", blocked="pending")
    per_server = demand / in_service
    measured = f"{_fmt(round(per_server, 1))} {unit} per server ({_fmt(round(demand, 1))} on {in_service})"
    if per_server > group.target:
        if desired >= group.max:
            return Decision(HOLD, desired, f"{measured} is above the target {_fmt(group.target)}, but the "
                                           f"group is at max {group.max}", blocked="max")
        wanted = min(group.max, max(desired + 1, math.ceil(demand / group.target)))
        if last_scale_out is not None and now - last_scale_out < group.scale_out_cooldown:
            left = group.scale_out_cooldown - (now - last_scale_out)
            return Decision(HOLD, desired, f"{measured} is above the target {_fmt(group.target)}: scale-out "
                                           f"to {wanted} waits for its cooldown ({left:.0f}s left)",
                            blocked="scale-out cooldown")
        return Decision(SCALE_OUT, wanted, f"{measured} is above the target {_fmt(group.target)}: "
                                           f"{wanted} servers keep it within target")
    if desired > group.min and in_service > 1 and demand / (in_service - 1) < group.target:
        fewer = demand / (in_service - 1)
        reason = (f"{measured}: {in_service - 1} server(s) would have {_fmt(round(fewer, 1))} each, "
                  f"below the target {_fmt(group.target)}")
        if last_change is not None and now - last_change < group.scale_in_cooldown:
            left = group.scale_in_cooldown - (now - last_change)
            return Decision(HOLD, desired, f"{reason}: scale-in waits for its cooldown ({left:.0f}s left)",
                            blocked="scale-in cooldown")
        return Decision(SCALE_IN, desired - 1, reason)
    return Decision(HOLD, desired, f"{measured}: within the target {_fmt(group.target)}")


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
        if not self.samples or self.samples[-1][1] - self.started < self.window / 2:
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
    return bool(status) and status.startswith("UP")


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
                                    f"service (health_grace {_fmt(grace)}s)"))
            elif name not in self.seen_up and failed_for > max(launch_grace, grace):
                found.append((name, f"{name} has not passed its health check in {failed_for:.0f}s"))
        return found


# -- the decisions log -------------------------------------------------------------------------

def decisions_path(paths: EnvPaths) -> Path:
    return paths.env_dir / DECISIONS_FILE


def status_path(paths: EnvPaths) -> Path:
    return paths.env_dir / STATUS_FILE


def log_decision(path: Path, entry: dict) -> None:
    """Append one decision (one JSON line, one write with O_APPEND) if the environment exists."""
    entry = {"time": lock.now_iso(), "ts": round(time.time(), 3), **entry}
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except FileNotFoundError:
        return  # destroyed meanwhile: do not bring its directory back
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_decisions(path: Path, last: int | None = None) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    found = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            found.append(entry)
    return found[-last:] if last else found


def write_status(path: Path, status: dict) -> None:
    """The autoscaler's last measurement, for `describe` (replaced whole; losing it costs nothing)."""
    if not path.parent.is_dir():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(status))
    os.replace(tmp, path)


# -- the lock ----------------------------------------------------------------------------------

class Locked(FabulaError):
    """The environment's lock is held by another command."""

    def __init__(self, error: FabulaError, holder: lock.Holder | None):
        super().__init__(error.message, error.hint)
        self.holder = holder


def lock_holder(paths: EnvPaths) -> lock.Holder | None:
    """Who holds the lock now (a stale lock counts as free: the next operation takes it over)."""
    try:
        holder = lock.read(paths)
    except lock.Unreadable:
        return None
    if holder is None or holder.is_stale() or holder.is_this_process():
        return None
    return holder


@contextmanager
def group_operation(ctx: Context, action: str, command: str | None = None,
                    wait_for_autoscaler: float = 0) -> Iterator[Operation]:
    """`operation(ctx, action)`, then the state read again (another command may have changed the
    group between our reading it and taking the lock). If the autoscaler holds the lock, wait up to
    `wait_for_autoscaler` seconds for it (its changes take seconds); any other holder: Locked."""
    deadline = time.monotonic() + wait_for_autoscaler
    told = False
    with ExitStack() as stack:
        while True:
            try:
                op = stack.enter_context(operation(ctx, action, command))
                break
            except FabulaError as exc:
                try:
                    holder = lock.read(ctx.paths)
                except lock.Unreadable:
                    holder = None
                if holder is not None and holder.action == ACTION and time.monotonic() < deadline:
                    if not told:
                        ctx.out.step(action, f"waiting for the autoscaler to finish ({holder.command})")
                        told = True
                    time.sleep(0.5)
                    continue
                raise Locked(exc, holder) from None
        ctx.state.reload(ctx.paths)
        ctx.hosts.clear()
        yield op


# -- changes to the group ----------------------------------------------------------------------

def launch_configuration(ctx: Context) -> Release:
    """The group's release, and what configuring a server needs (secrets, CA)."""
    if not ctx.state.release:
        raise FabulaError(f"environment {ctx.env_name} has no release yet", f"run `fabula create {ctx.env_name}`")
    found = releases.load(ctx, ctx.state.release)
    if found is None:
        raise FabulaError(f"the web group's release {ctx.state.release} is not on disk "
                          f"({ctx.paths.releases_dir / ctx.state.release})",
                          f"rebuild it: `fabula release build {ctx.env_name} --rev {ctx.state.release}`")
    ctx.secrets = secrets.load_or_create(ctx.paths)
    ctx.ca = pki.CertificateAuthority(ctx.paths)
    ctx.release = found
    return found


def launch(ctx: Context, release: Release) -> str:
    """A new web server from the launch configuration, in service once healthy; removed again if
    it does not get there."""
    before = set(ctx.state.servers)
    try:
        return launch_web_server(ctx, release).name
    except Exception as exc:
        for name in set(ctx.state.servers) - before:
            try:
                retire_web_server(ctx, name)
            except Exception as cleanup:  # noqa: BLE001 - report the launch's error, not this one
                ctx.out.warn(f"could not remove the failed web server {name}: {cleanup}")
        raise FabulaError(f"a new web server from release {release.id} did not come into service: {exc}",
                          f"see `fabula logs {ctx.env_name}`") from exc


def victims(ctx: Context, count: int, health: dict[str, str]) -> list[str]:
    """Which web servers leave on a scale-in: failing ones first, then those on another release
    than the group's, then the newest (as `create` leaves out the highest numbers)."""
    records = ctx.state.by_role("web")
    order = sorted(records, key=lambda r: (not failing(health.get(r.name)), r.release == ctx.state.release,
                                           -_server_number(r.name)))
    return [r.name for r in order[:count]]


def _server_number(name: str) -> int:
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits else 0


def converge(ctx: Context, op: Operation, health: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Launch or retire web servers until the group has its desired count."""
    desired = current_desired(ctx)
    webs = ctx.state.by_role("web")
    done: dict[str, list[str]] = {"launched": [], "retired": []}
    if len(webs) < desired:
        release = launch_configuration(ctx)
        for n in range(desired - len(webs)):
            with op.phase(f"launch {n + 1} of {desired - len(webs)}"):
                done["launched"].append(launch(ctx, release))
    elif len(webs) > desired:
        health = ctx.provider.load_balancer.health() if health is None else health
        for name in victims(ctx, len(webs) - desired, health):
            with op.phase(f"retire {name}"):
                retire_web_server(ctx, name)
                done["retired"].append(name)
    op.details.update({k: v for k, v in done.items() if v})
    return done


def set_desired(ctx: Context, op: Operation, desired: int, health: dict[str, str] | None = None) -> dict:
    """Record the group's new desired count, then launch or retire servers to reach it."""
    check_desired(ctx, desired)
    op.details.update(from_desired=current_desired(ctx), to_desired=desired)
    ctx.state.web_desired = desired
    ctx.state.save(ctx.paths)
    return converge(ctx, op, health)


def replace(ctx: Context, op: Operation, name: str) -> dict[str, list[str]]:
    """A new web server from the launch configuration takes a failing one's place; the failing
    one then leaves (drained, should it still have requests). The new one first: it takes traffic
    a few seconds sooner, and the group is never smaller than it already is."""
    release = launch_configuration(ctx)
    with op.phase("launch"):
        new = launch(ctx, release)
    with op.phase(f"retire {name}"):
        retire_web_server(ctx, name)
    op.details.update(replaced=name, launched=[new])
    return {"retired": [name], "launched": [new]}


def scale(ctx: Context, desired: int, wait: float = 180) -> dict:
    """`fabula scale ENV --desired N`: set the desired count and converge now."""
    check_desired(ctx, desired)
    if not ctx.state.release:
        raise FabulaError(f"environment {ctx.env_name} has not been created", f"run `fabula create {ctx.env_name}`")
    started = time.monotonic()
    with group_operation(ctx, "scale", wait_for_autoscaler=wait) as op:
        before = current_desired(ctx)
        entry = {"action": "scale", "by": lock.owner(), "from": before, "to": desired,
                 "reason": f"`fabula scale --desired {desired}`"}
        try:
            done = set_desired(ctx, op, desired)
        except BaseException as exc:
            log_decision(decisions_path(ctx.paths), {**entry, "outcome": "failed", "error": str(exc).splitlines()[0],
                                                     "seconds": round(time.monotonic() - started, 1)})
            raise
        log_decision(decisions_path(ctx.paths), {**entry, **done, "outcome": "ok",
                                                 "seconds": round(time.monotonic() - started, 1)})
    return {"from": before, "to": desired, **done}


def set_suspended(ctx: Context, suspend: bool, processes: list[str] | None, wait: float = 180) -> list[str]:
    """Suspend or resume the autoscaler's processes (all by default); returns those suspended."""
    processes = processes or list(PROCESSES)
    unknown = [p for p in processes if p not in PROCESSES]
    if unknown:
        raise ConfigError(f"unknown autoscaling process {unknown[0]!r}", f"use one of: {', '.join(PROCESSES)}")
    with group_operation(ctx, "suspend autoscaling" if suspend else "resume autoscaling",
                         wait_for_autoscaler=wait) as op:
        current = set(ctx.state.autoscaling_suspended)
        current = current | set(processes) if suspend else current - set(processes)
        ctx.state.autoscaling_suspended = [p for p in PROCESSES if p in current]
        ctx.state.save(ctx.paths)
        op.details["suspended"] = ", ".join(ctx.state.autoscaling_suspended) or "none"
        log_decision(decisions_path(ctx.paths), {
            "action": "suspend" if suspend else "resume", "by": lock.owner(), "processes": processes,
            "suspended": ctx.state.autoscaling_suspended, "outcome": "ok",
            "reason": f"`fabula autoscaling {'suspend' if suspend else 'resume'}`"})
    return ctx.state.autoscaling_suspended


# -- the controller program --------------------------------------------------------------------

def controller_program(ctx: Context) -> Program:
    """The autoscaler as a program of the load balancer's (the platform's) supervisor."""
    # it runs as root: fabula's own code only, never a module of the app's folder (`-I`: no
    # current directory or script folder on sys.path, no PYTHON* variables, no user site), from
    # the environment's state directory, with a fixed PATH
    return Program(
        name=PROGRAM,
        command=[sys.executable, "-I", "-m", "fabula", "autoscaler", ctx.env_name, "-c", str(ctx.config.path),
                 "--decisions", str(decisions_path(ctx.paths))],
        environment={"FABULA_STATE_DIR": str(ctx.paths.root), "PATH": SYSTEM_PATH, "PYTHONUNBUFFERED": "1"},
        directory=str(ctx.paths.env_dir), stopsignal="TERM", stopwaitsecs=20)


def start_controller(ctx: Context) -> None:
    """(Re)start the autoscaler under the platform's supervisor, so it runs the current code."""
    supervisor = ctx.provider.load_balancer.supervisor
    supervisor.ensure_running()
    if not supervisor.apply([controller_program(ctx)]):
        supervisor.restart(PROGRAM)
    supervisor.wait_running([PROGRAM], timeout=30)
    ctx.out.step(PROGRAM, "running (web group: "
                 + _group_line(group_config(ctx), current_desired(ctx)) + ")")


def _group_line(group: AutoscalingConfig, desired: int) -> str:
    unit = "sessions" if group.metric == "sessions" else "requests/s"
    return f"desired {desired}, min {group.min}, max {group.max}, target {_fmt(group.target)} {unit} per server"


def controller_state(ctx: Context) -> str:
    lb = ctx.provider.load_balancer
    if not lb.is_running():
        return "not running"
    return (lb.supervisor.status().get(PROGRAM) or "not installed").lower()


# -- describe ----------------------------------------------------------------------------------

def group_report(ctx: Context, health: dict[str, str], decisions: int = 5) -> dict:
    """The web group as `fabula describe` shows it."""
    group = group_config(ctx)
    members = [r.name for r in ctx.state.by_role("web")]
    serving = [n for n in members if in_service(health.get(n))]
    status = _read_json(status_path(ctx.paths))
    fresh = status and time.time() - status.get("ts", 0) < max(3 * group.interval, 10)
    if fresh and status.get("demand") is not None:
        demand, source = status["demand"], "autoscaler"
    else:
        stats = ctx.provider.load_balancer.stats() if health else {}
        demand = live_demand(group.metric, {n: r for n, r in stats.items() if n in members}) if stats else None
        source = "load balancer"
    per_server = round(demand / len(serving), 2) if demand is not None and serving else None
    return {
        "configured": ctx.env.autoscaling is not None,
        "min": group.min, "desired": current_desired(ctx), "max": group.max,
        "metric": group.metric, "target": group.target,
        "scale_out_cooldown": group.scale_out_cooldown, "scale_in_cooldown": group.scale_in_cooldown,
        "health_grace": group.health_grace, "interval": group.interval,
        "servers": members, "in_service": len(serving),
        "demand": {"total": round(demand, 2) if demand is not None else None, "per_server": per_server,
                   "source": source},
        "suspended": list(ctx.state.autoscaling_suspended),
        "controller": controller_state(ctx) if ctx.paths.state_file.exists() else "not running",
        # the last changes and held-back changes (rounds skipped under another command's lock are
        # only in `fabula autoscaling ENV decisions`: `lock` already says who holds it)
        "decisions": [d for d in read_decisions(decisions_path(ctx.paths)) if d.get("action") != "skip"][-decisions:],
    }


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def describe_lines(report: dict) -> list[str]:
    """The group as plain lines under `describe`'s table."""
    unit = "sessions" if report["metric"] == "sessions" else "requests/s"
    demand = report["demand"]
    if demand["per_server"] is not None:
        now = f"{_fmt(demand['per_server'])} {unit} per server ({_fmt(demand['total'])} in all)"
    elif demand["total"] is not None:
        now = f"{_fmt(demand['total'])} {unit} in all"
    else:
        now = "not measured"
    kind = "autoscaling" if report["configured"] else "fixed (no `autoscaling` in fabula.yml; self-healing only)"
    target = f"target {_fmt(report['target'])} {unit} per server; " if report["configured"] else ""
    lines = [f"web group: {report['in_service']} in service, desired {report['desired']} "
             f"(min {report['min']}, max {report['max']}), {kind}",
             f"  {target}demand now {now}; autoscaler {report['controller']}; "
             f"suspended: {', '.join(report['suspended']) or 'none'}"]
    for entry in report["decisions"]:
        lines.append("  " + decision_line(entry))
    return lines


def decision_line(entry: dict) -> str:
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


def as_dict(decision: Decision) -> dict:
    return asdict(decision)
