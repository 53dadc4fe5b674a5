"""The web group's changes: its desired count set and reached (`fabula scale`, the autoscaler),
a failing server replaced, the autoscaler's processes suspended and resumed.

Every change runs as an operation (the environment's lock and a history record:
group_operation) and goes through the group primitives of deploy/group.py: a new server joins
the load balancer only once healthy, a leaving one is drained first.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from fabula import pki, secrets
from fabula import release as releases
from fabula.autoscaling import warm_pool
from fabula.autoscaling.log import decisions_path, log_decision
from fabula.autoscaling.policy import PROCESSES, check_desired, current_desired, failing
from fabula.context import Context, Release
from fabula.deploy import native
from fabula.deploy.group import launch_or_remove_many, retire_web_server, retire_web_servers
from fabula.environment import lock
from fabula.environment.audit import Operation, operation
from fabula.errors import ConfigError, FabulaError
from fabula.providers.base import NativeWebGroup
from fabula.state import EnvPaths

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
def group_operation(ctx: Context, action: str, command: str | None = None) -> Iterator[Operation]:
    """`operation(ctx, action)` for a change of the group; Locked (naming the holder) if another
    command holds the lock.

    operation() itself waits for a change of the autoscaler's to finish (environment/audit.py:
    one wait for every command, the autoscaler's own changes excepted) and reads the state again
    once it holds the lock (another command may have changed the group meanwhile)."""
    with ExitStack() as stack:
        try:
            op = stack.enter_context(operation(ctx, action, command))
        except FabulaError as exc:
            try:
                holder = lock.read(ctx.paths)
            except lock.Unreadable:
                holder = None
            raise Locked(exc, holder) from None
        ctx.hosts.clear()  # the state may have changed: hosts are looked up afresh
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


def launch(ctx: Context, release: Release, count: int = 1) -> list[str]:
    """`count` new web servers from the launch configuration, launched at once, in service once
    healthy; removed again if they do not get there."""
    try:
        return [r.name for r in launch_or_remove_many(ctx, release, count)]
    except Exception as exc:
        raise FabulaError(f"{count} new web server(s) from release {release.id} did not come into service: {exc}",
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
        with op.phase(f"launch {desired - len(webs)}"):
            # the warm pool's first: in service in about a second
            done["from_warm_pool"] = warm_pool.take(ctx, release, desired - len(webs))
            done["launched"] += done["from_warm_pool"]
            if len(done["launched"]) < desired - len(webs):
                done["launched"] += launch(ctx, release, desired - len(webs) - len(done["launched"]))
    elif len(webs) > desired:
        health = ctx.provider.load_balancer.health() if health is None else health
        leaving = victims(ctx, len(webs) - desired, health)
        with op.phase(f"retire {', '.join(leaving)}"):   # drained together
            retire_web_servers(ctx, leaving)
            done["retired"] += leaving
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
        warm = warm_pool.take(ctx, release, 1)
        new = (warm or launch(ctx, release))[0]
    with op.phase(f"retire {name}"):
        retire_web_server(ctx, name)
    op.details.update(replaced=name, launched=[new], from_warm_pool=warm)
    return {"retired": [name], "launched": [new], "from_warm_pool": warm}


# -- the operator's commands -------------------------------------------------------------------

def scale(ctx: Context, desired: int) -> dict:
    """`fabula scale ENV --desired N`: set the desired count and converge now."""
    check_desired(ctx, desired)
    if not ctx.state.release:
        raise FabulaError(f"environment {ctx.env_name} has not been created", f"run `fabula create {ctx.env_name}`")
    started = time.monotonic()
    with group_operation(ctx, "scale") as op:
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


def scale_native(ctx: Context, group: NativeWebGroup, desired: int) -> dict:
    """`fabula scale` on the platform's own group: its desired count set, and each instance it
    launches converged and put in service (one it retires is drained by the platform: the group
    is attached to the load balancer)."""
    check_desired(ctx, desired)
    started = time.monotonic()
    with group_operation(ctx, "scale") as op:
        release = launch_configuration(ctx)
        result = group.set_desired(desired)
        entry = {"action": "scale", "by": lock.owner(), "from": result["from"], "to": desired,
                 "reason": f"`fabula scale --desired {desired}`"}
        try:
            converged = native.admit(ctx, group, desired, release)
        except BaseException as exc:
            log_decision(decisions_path(ctx.paths), {**entry, "outcome": "failed", "error": str(exc).splitlines()[0],
                                                     "seconds": round(time.monotonic() - started, 1)})
            raise
        if converged:  # what the group launched and fabula converged (the platform may take a while to say)
            result["launched"] = converged
        op.details.update(from_desired=result["from"], to_desired=desired, converged=converged)
        log_decision(decisions_path(ctx.paths), {**entry, "outcome": "ok", "launched": converged,
                                                 "seconds": round(time.monotonic() - started, 1)})
    return result


def set_suspended(ctx: Context, suspend: bool, processes: list[str] | None) -> list[str]:
    """Suspend or resume the autoscaler's processes (all by default); returns those suspended."""
    processes = processes or list(PROCESSES)
    unknown = [p for p in processes if p not in PROCESSES]
    if unknown:
        raise ConfigError(f"unknown autoscaling process {unknown[0]!r}", f"use one of: {', '.join(PROCESSES)}")
    with group_operation(ctx, "suspend autoscaling" if suspend else "resume autoscaling") as op:
        current = set(ctx.state.autoscaling_suspended)
        current = current | set(processes) if suspend else current - set(processes)
        ctx.state.autoscaling_suspended = [p for p in PROCESSES if p in current]
        group = ctx.provider.web_group(ctx)
        if group is not None:  # the platform's group acts on its own: its processes are the ones to hold
            group.suspend(ctx.state.autoscaling_suspended if suspend else processes, suspend)
        ctx.state.save(ctx.paths)
        op.details["suspended"] = ", ".join(ctx.state.autoscaling_suspended) or "none"
        log_decision(decisions_path(ctx.paths), {
            "action": "suspend" if suspend else "resume", "by": lock.owner(), "processes": processes,
            "suspended": ctx.state.autoscaling_suspended, "outcome": "ok",
            "reason": f"`fabula autoscaling {'suspend' if suspend else 'resume'}`"})
    return ctx.state.autoscaling_suspended
