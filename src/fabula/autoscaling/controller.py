"""The autoscaler: a long-running program of the environment (under the load balancer's own
supervisor) that keeps the web group at the size its demand needs, and replaces web servers
that fail their health check.

Every `interval` it reads the load balancer's statistics, measures the demand and each web
server's health; then, in this order, it
  1. (healing) replaces a web server that has failed its health check for longer than
     `health_grace` after it was in service, or launches/retires servers if the group does not
     have its desired count;
  2. (scaling) decides the desired count from the demand (see policy.decide) and converges.
Each change is one operation: the environment's lock, a history record, the group primitives.
When another command holds the lock (a deploy, `fabula scale`), the round is skipped. Every
decision and every change wanted but held back (cooldown, max, suspended, locked) is appended
to <env dir>/autoscaler.jsonl with its reason, and printed to the program's log.

`create` installs it under the platform's supervisor (install_controller, then
wait_controller); it runs as `python -I -m fabula autoscaler ENV` (the hidden command of
cli/scaling.py). It keeps nothing before the environment's first create has finished.
"""
from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

from fabula.autoscaling import hosts, warm_pool
from fabula.autoscaling.actions import (
    Locked,
    converge,
    group_operation,
    launch_configuration,
    lock_holder,
    replace,
    set_desired,
)
from fabula.autoscaling.log import decisions_path, log_decision, read_decisions, status_path, write_status
from fabula.autoscaling.policy import (
    HOLD,
    SCALE_IN,
    SCALE_OUT,
    DemandMeter,
    HealthTracker,
    bounds,
    current_desired,
    decide,
    failing,
    fmt,
    group_config,
    in_service,
    unit,
)
from fabula.context import Context
from fabula.deploy import native
from fabula.environment import sharing
from fabula.environment.audit import AUTOSCALER_ACTION
from fabula.environment.lock import now_iso
from fabula.environment.opening import open_environment
from fabula.errors import FabulaError
from fabula.output import Output
from fabula.providers.base import SYSTEM_PATH, NativeWebGroup, ProgramHome
from fabula.state import EnvPaths
from fabula.supervisor import Program, Supervisor

PROGRAM = "autoscaler"
WARM = "warm"   # the decisions log's action of a change to the warm pool
DEFAULT_INTERVAL = 2.0
# after a failed change the autoscaler waits before trying again: 15 s, 30 s, ... up to 10 min
BACKOFF_FIRST, BACKOFF_MAX = 15.0, 600.0


# -- its installation --------------------------------------------------------------------------

def controller_program(ctx: Context, home: ProgramHome) -> Program:
    """The autoscaler as a program of the load balancer's (the platform's) supervisor."""
    # it runs as root: fabula's own code only, never a module of the app's folder (`-I`: no
    # current directory or script folder on sys.path, no PYTHON* variables, no user site), from
    # the environment's state directory, with a fixed PATH
    there = EnvPaths(Path(home.state_root), ctx.paths.project, ctx.paths.env)
    return Program(
        name=PROGRAM,
        command=[home.python, "-I", "-m", "fabula", "autoscaler", ctx.env_name, "-c", home.config,
                 "--decisions", str(decisions_path(there))],
        environment={**home.environment, "FABULA_STATE_DIR": home.state_root, "PATH": SYSTEM_PATH,
                     "PYTHONUNBUFFERED": "1"},
        directory=str(there.env_dir), stopsignal="TERM", stopwaitsecs=20)


def install_controller(ctx: Context) -> None:
    """(Re)start the autoscaler under the platform's supervisor, so it runs the current code;
    wait_controller() waits until it runs. While `create` holds the environment's lock it
    changes nothing, so create installs it early, beside the app servers, where supervisord's
    wait for a program to count as running (STARTSECS) is off create's path."""
    host = ctx.provider.platform_host()
    home = ctx.provider.program_home(ctx.config.path, ctx.paths.root, ctx.config.project.app.python)
    supervisor = Supervisor(host)
    supervisor.ensure_running()
    if not supervisor.apply([controller_program(ctx, home)]):
        supervisor.restart(PROGRAM)


def wait_controller(ctx: Context) -> None:
    """Wait until the installed autoscaler runs, and say what it keeps. On a platform's own
    group (AWS) it is the group's keeper: it converges what the group launches by itself; the
    group's own policy keeps its size."""
    host = ctx.provider.platform_host()
    Supervisor(host).wait_running([PROGRAM], timeout=30)
    if ctx.provider.web_group(ctx) is not None:
        ctx.out.step(PROGRAM, f"running on {host.name}: it converges and puts in service the web servers the "
                              "platform's group launches by itself (its scaling policy, replacements)")
        return
    if ctx.env.fixed_inventory:
        ctx.out.step(PROGRAM, f"running on {host.name}: it records a host that stops answering, and starts its "
                              "services again when it answers")
        return
    group = group_config(ctx)
    limits = bounds(group)
    ctx.out.step(PROGRAM, f"running (web group: desired {current_desired(ctx)}, min {group.min}, max {limits.max}, "
                          f"target {fmt(limits.target)} {unit(group.metric)} per server)")


def controller_state(ctx: Context) -> str:
    """The autoscaler program's state under the platform's supervisor (running, stopped...)."""
    supervisor = Supervisor(ctx.provider.platform_host())
    if not supervisor.is_running():
        return "not running"
    return (supervisor.status().get(PROGRAM) or "not installed").lower()


# -- the program -------------------------------------------------------------------------------

class ClockOutput(Output):
    """Progress lines with the time of day: the program's log runs for days."""

    def step(self, where: str, message: str) -> None:
        if not self.quiet:
            with self._lock:
                self.err.print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [bold]{where:<12}[/bold] {message}",
                               highlight=False, soft_wrap=True)


class Controller:
    def __init__(self, config_path: Path, env_name: str, decisions: Path | None = None,
                 out: Output | None = None, clock: Callable[[], float] = time.monotonic, shipped: bool = False):
        """`shipped`: fabula runs on the platform host, away from the app's folder (program_home)."""
        self.config_path, self.env_name, self.shipped = Path(config_path), env_name, shipped
        self.decisions = decisions
        self.out = out or ClockOutput()
        self.clock = clock
        self.meter: DemandMeter | None = None
        self.tracker = HealthTracker()
        self.last_scale_out: float | None = None
        self.last_change: float | None = None
        self.known_desired: int | None = None
        self.failures = 0
        self.retry_at = 0.0
        # the warm pool's own: a refill that keeps failing must not hold back healing and scaling
        self.warm_failures = 0
        self.warm_retry_at = 0.0
        # what held the group back in the last round, and in this one: each is logged once, when it starts
        self.held: set[str] = set()
        self.holding: set[str] = set()
        self.recovered = False
        self.last_error: str | None = None
        # a platform's group: its members in service when the state last had exactly them
        self.kept: set[str] | None = None
        self.hosts = hosts.HostWatch()   # a fixed inventory's

    # -- the log --------------------------------------------------------------------------
    def log(self, ctx: Context, entry: dict) -> None:
        path = self.decisions or decisions_path(ctx.paths)
        log_decision(path, {"by": PROGRAM, **entry})

    def notice(self, ctx: Context, action: str, reason: str, key: str, **extra) -> None:
        """A decision not to act (or not able to): logged in the first of the rounds it holds for."""
        self.holding.add(key)
        if key in self.held:
            return
        self.out.step(PROGRAM, f"{action}: {reason}")
        self.log(ctx, {"action": action, "reason": reason, **extra})

    def error(self, message: str) -> None:
        """A round that could not run, in the program's log: once, until it runs again."""
        if message != self.last_error:
            self.last_error = message
            self.out.step(PROGRAM, message)

    def recover(self, ctx: Context) -> None:
        """Cooldowns survive a restart: the last scale activities from the decisions log."""
        self.recovered = True
        now, wall = self.clock(), time.time()
        # (re)started by `create`, which may just have changed the group: scale-in waits its cooldown
        self.last_change = now
        for entry in read_decisions(self.decisions or decisions_path(ctx.paths)):
            if entry.get("outcome") != "ok" or not isinstance(entry.get("ts"), (int, float)):
                continue
            at = now - (wall - entry["ts"])
            if entry.get("action") == SCALE_OUT:
                self.last_scale_out = at
            if entry.get("action") in (SCALE_OUT, SCALE_IN, "scale"):
                self.last_change = max(self.last_change, at)

    # -- one round ------------------------------------------------------------------------
    def round(self) -> float:
        """Measure, decide, maybe change; returns the seconds until the next round."""
        self.holding = set()
        try:
            return self._round()
        finally:
            self.held = self.holding

    def _round(self) -> float:
        try:
            # the shared files (a team's store) are read below, when the round needs them
            ctx = open_environment(self.config_path, self.env_name, self.out, check_paths=not self.shipped,
                                   shared=False)
        except FabulaError as exc:
            self.error(f"cannot read {self.config_path}: {exc}")
            return DEFAULT_INTERVAL
        group = ctx.env.web_group()
        if ctx.env.fixed_inventory:
            try:
                self.watch(ctx)
            finally:
                ctx.provider.close()
            return group.interval
        platform_group = ctx.provider.web_group(ctx)
        if platform_group is not None:
            try:
                self.keep(ctx, platform_group)
            finally:
                ctx.provider.close()
            return group.interval
        sharing.refresh(ctx)
        if not ctx.paths.state_file.exists():
            return group.interval  # not created yet, or destroyed: nothing to keep
        if ctx.state.release is None:
            # the first create has not finished (or failed): its web servers are not in service yet
            return group.interval
        if not self.recovered:
            self.recover(ctx)
            self.out.step(PROGRAM, f"watching {ctx.project}/{ctx.env_name}: min {group.min}, max {group.max}, "
                                   f"target {group.target:g} {group.metric} per server")
        now = self.clock()
        stats = ctx.provider.load_balancer.stats()
        members = [r.name for r in ctx.state.by_role("web")]
        desired = current_desired(ctx)
        if self.known_desired is not None and desired != self.known_desired:
            self.last_change = now  # changed by `fabula scale` (or create): counts for the cooldown
        self.known_desired = desired
        if not stats:
            self.notice(ctx, HOLD, "the load balancer does not answer (no statistics)", key="no stats")
            return group.interval
        health = {name: row.get("status", "") for name, row in stats.items()}
        self.last_error = None  # measuring works (again)
        if self.meter is None or (self.meter.metric, self.meter.window) != (group.metric, group.window):
            self.meter = DemandMeter(group.metric, group.window)
        self.meter.add(now, stats, set(members))
        demand = self.meter.value()
        serving = [n for n in members if in_service(health.get(n))]
        holder = lock_holder(ctx.paths)
        if holder is None:
            self.tracker.observe(now, members, health)
        else:
            self.tracker.pause()
            self.meter = None  # the other command may reload the load balancer: measure afresh after it
        measured = {"demand": round(demand, 2) if demand is not None else None, "in_service": len(serving),
                    "per_server": round(demand / len(serving), 2) if demand is not None and serving else None}
        write_status(status_path(ctx.paths), {"ts": time.time(), "time": now_iso(), "metric": group.metric,
                                              "desired": desired, "servers": members, **measured,
                                              "health": {n: health.get(n) for n in members},
                                              "locked_by": holder.action if holder else None})
        if holder is not None:
            self.notice(ctx, "skip", f"the environment is locked by `{holder.command}` ({holder.action}, pid "
                                     f"{holder.pid}): no changes while it runs", key=f"locked {holder.id}")
            return group.interval
        if now < self.retry_at:
            return group.interval
        suspended = set(ctx.state.autoscaling_suspended)

        if "healing" not in suspended:
            unhealthy = self.tracker.unhealthy(now, group.health_grace)
            if unhealthy:
                name, reason = unhealthy[0]
                self.change(ctx, "replace", reason, lambda c, op: replace(c, op, name),
                            still=lambda c: name in c.state.servers
                            and failing(c.provider.load_balancer.health().get(name)), measured=measured)
                return group.interval
            if len(members) != desired:
                action = "launch" if len(members) < desired else "retire"
                self.change(ctx, action, f"the group has {len(members)} web server(s), its desired count is "
                                         f"{desired}", lambda c, op: converge(c, op, health), measured=measured)
                return group.interval
        elif len(members) != desired or self.tracker.unhealthy(now, group.health_grace):
            self.notice(ctx, HOLD, "the group needs healing (a failing server, or not its desired count), but "
                                   "healing is suspended", key="healing suspended")

        decision = decide(group, desired, len(serving), demand, now, self.last_scale_out, self.last_change)
        if "scaling" in suspended:
            if decision.action != HOLD:
                self.notice(ctx, HOLD, f"{decision.action} to {decision.desired} wanted ({decision.reason}), but "
                                       "scaling is suspended", key="scaling suspended", **measured)
            self.keep_warm(ctx, suspended)
            return group.interval
        if decision.action == HOLD:
            if decision.blocked and decision.blocked != "pending":
                self.notice(ctx, HOLD, decision.reason, key=decision.blocked, **measured)
            self.keep_warm(ctx, suspended)   # after the group's own changes: a scale-out takes from it first
            return group.interval
        self.change(ctx, decision.action, decision.reason,
                    lambda c, op: set_desired(c, op, decision.desired, health),
                    still=lambda c: current_desired(c) == desired, measured=measured,
                    **{"from": desired, "to": decision.desired})
        return group.interval

    def keep_warm(self, ctx: Context, suspended: set[str]) -> None:
        """The warm pool refilled, or started again from the group's release (warm_pool.py); held
        with healing, whose servers it provides."""
        reason = warm_pool.upkeep(ctx)
        if reason is None or self.clock() < self.warm_retry_at:
            return
        if "healing" in suspended:
            self.notice(ctx, HOLD, f"{reason}, but healing is suspended", key="warm pool held")
            return
        self.change(ctx, WARM, reason, lambda c, op: warm_pool.keep(c, op, launch_configuration(c)),
                    still=lambda c: warm_pool.upkeep(c) is not None)

    def keep(self, ctx: Context, group: NativeWebGroup) -> None:
        """On a platform's own group: its size is its policy's; what the group launched by itself
        is converged and put in service, what it terminated forgotten (deploy/native.keep)."""
        if not self.recovered:
            self.recovered = True
            self.out.step(PROGRAM, f"keeping {ctx.project}/{ctx.env_name}'s web group: converging what it launches")
        serving = {m.name for m in group.in_service()}
        if serving == self.kept or self.clock() < self.retry_at:
            return  # as the state was when it last matched (or backing off after a failed change)
        sharing.refresh(ctx)
        if not ctx.paths.state_file.exists():
            return  # not created yet, or destroyed

        def changed(c: Context) -> tuple[list[str], list[str]]:
            members = {m.name for m in group.in_service()}
            recorded = {r.name for r in c.state.by_role("web")}
            return sorted(members - recorded), sorted(recorded - members)

        new, gone = changed(ctx)
        if not new and not gone:
            self.last_error = None
            self.kept = serving
            return
        self.kept = None
        if ctx.state.release is None:
            return  # `create` has not finished yet: it converges them itself
        reason = "; ".join(part for part in (
            f"the group launched {', '.join(new)}" if new else "",
            f"{', '.join(gone)} left the group" if gone else "") if part)
        self.change(ctx, "admit" if new else "forget", reason,
                    lambda c, op: native.keep(c, group, launch_configuration(c)),
                    still=lambda c: changed(c) != ([], []))

    def watch(self, ctx: Context) -> None:
        """On a fixed inventory: a host that stops answering recorded as down, one that answers
        again brought back (autoscaling/hosts.py)."""
        if not self.recovered:
            self.recovered = True
            self.out.step(PROGRAM, f"watching {ctx.project}/{ctx.env_name}'s hosts: a dead host is recorded, its "
                                   "services started again when it answers")
        to_record, to_restart = self.hosts.observe(hosts.probe(ctx))
        if not to_record and not to_restart or self.clock() < self.retry_at:
            return  # (or backing off after a failed change: its hosts are still down, or back)
        sharing.refresh(ctx)
        def noted(op, done: dict) -> dict:
            op.details.update(done)   # in the history too
            return done

        for name in to_record:
            if self.change(ctx, "host down", f"{name} has not answered on SSH for {hosts.DOWN_AFTER} rounds",
                           lambda c, op, name=name: noted(op, {"host": name})):
                self.hosts.recorded.add(name)
        for name in to_restart:
            down_for = time.time() - self.hosts.down[name]
            if self.change(ctx, "host back", f"{name} answers again after {down_for:.0f}s down",
                           lambda c, op, name=name: noted(op, {"host": name, **hosts.bring_back(c, name)})):
                self.hosts.forget(name)

    def change(self, ctx: Context, action: str, reason: str, apply: Callable, still: Callable | None = None,
               measured: dict | None = None, **entry) -> bool:
        """One change to the group, as an operation; logged with its outcome. True once done."""
        self.out.step(PROGRAM, f"{action}: {reason}")
        started = self.clock()
        warm = action == WARM   # out of the load balancer: it leaves the measurement alone
        if not warm:
            self.meter = None  # the change reloads the load balancer (its counters restart): measure afresh
        entry = {"action": action, "reason": reason, **(measured or {}), **entry}
        try:
            with group_operation(ctx, AUTOSCALER_ACTION, command=f"fabula autoscaler {ctx.env_name} ({action})") as op:
                op.details.update(decision=action, reason=reason)
                if still is not None and not still(ctx):
                    self.notice(ctx, "skip", f"{action} no longer needed: the group changed meanwhile",
                                key=f"changed {started}")
                    return False
                done = apply(ctx, op)
        except Locked as exc:
            holder = exc.holder
            self.notice(ctx, "skip", f"{action} wanted ({reason}), but the environment is locked by "
                                     f"`{holder.command if holder else '?'}`",
                        key=f"locked {holder.id if holder else '?'}")
            return False
        except Exception as exc:  # noqa: BLE001 - logged; the next attempt waits (backoff)
            if warm:
                self.warm_failures += 1
                wait = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.warm_failures - 1))
                self.warm_retry_at = self.clock() + wait
            else:
                self.failures += 1
                wait = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures - 1))
                self.retry_at = self.clock() + wait
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.out.step(PROGRAM, f"{action} failed: {exc} (next attempt in {wait:.0f}s)")
            self.log(ctx, {**entry, "outcome": "failed", "error": message, "retry_in": wait,
                           "seconds": round(self.clock() - started, 1)})
            return False
        if warm:
            self.warm_failures = 0
        else:
            self.failures = 0
        ended = self.clock()
        if action == SCALE_OUT:
            self.last_scale_out = ended
        if action in (SCALE_OUT, SCALE_IN):
            self.last_change = ended
        self.known_desired = current_desired(ctx)
        self.out.step(PROGRAM, f"{action} done in {ended - started:.1f}s")
        self.log(ctx, {**entry, **(done or {}), "outcome": "ok", "seconds": round(ended - started, 1)})
        return True

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> None:
        def stop(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        try:
            while True:
                started = self.clock()
                try:
                    interval = self.round()
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:  # noqa: BLE001 - a bad round must not end the controller
                    self.error(f"error: {type(exc).__name__}: {exc}")
                    interval = DEFAULT_INTERVAL
                time.sleep(max(0.0, started + interval - self.clock()))
        except KeyboardInterrupt:
            self.out.step(PROGRAM, "stopped")
