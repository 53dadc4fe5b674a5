"""The web group's warm pool (`autoscaling.warm`), as an Auto Scaling group's: web servers started
from the group's release, out of the load balancer and not members of the group, so that a
scale-out or the replacement of a failed server only has to put one in service (the load
balancer's health check: about a second) rather than launch one (its namespace, nginx, PgBouncer
and gunicorn: seconds, more under load). The autoscaler keeps the pool: it refills it once a
server is taken from it, and starts it again from the new release after a deploy."""
from __future__ import annotations

from fabula.context import Context, Release
from fabula.deploy.group import (
    bring_into_service,
    launch_or_remove_many,
    reserve_web_servers,
    retire_web_servers,
)
from fabula.environment.audit import Operation
from fabula.errors import FabulaError

# seconds a warm server has to pass its health check once in the load balancer (a started one
# passes in about one): one that does not is replaced by a launch rather than waited for
TAKE_TIMEOUT = 10


def take(ctx: Context, release: Release, count: int) -> list[str]:
    """Up to `count` warm servers of `release` put in service: members of the group from now on.
    One that fails its health check is retired (the caller launches what is still missing)."""
    ready = [r for r in ctx.state.warm_pool() if r.release == release.id][:count]
    if not ready:
        return []
    for record in ready:
        record.warm = False
    ctx.state.save(ctx.paths)
    names = [r.name for r in ready]
    for name in names:
        ctx.out.step(name, "from the warm pool")
    try:
        bring_into_service(ctx, names, timeout=TAKE_TIMEOUT)
    except FabulaError as exc:
        health = ctx.provider.load_balancer.health()
        failed = [n for n in names if health.get(n) != "UP"]
        ctx.out.warn(f"warm server(s) {', '.join(failed)} did not pass the health check ({exc}): replaced")
        retire_web_servers(ctx, failed)
        return [n for n in names if n not in failed]
    return names


def upkeep(ctx: Context) -> str | None:
    """Why the pool needs a change (servers of another release than the group's, too few or too
    many), or None when it is as `autoscaling.warm` wants it."""
    if ctx.state.release is None:
        return None   # `create` has not finished
    wanted = ctx.env.web_group().warm
    pool = ctx.state.warm_pool()
    stale = [r.name for r in pool if r.release != ctx.state.release]
    fresh = len(pool) - len(stale)
    reasons = [f"{', '.join(stale)} of the warm pool run(s) another release than the group's"] if stale else []
    if fresh != wanted:
        reasons.append(f"the warm pool has {fresh} server(s) of the group's release, {wanted} wanted")
    return "; ".join(reasons) or None


def keep(ctx: Context, op: Operation, release: Release) -> dict[str, list[str]]:
    """The pool at `autoscaling.warm` servers of `release` (the group's): the others removed (they
    take no traffic: nothing to drain), the missing ones launched, out of the load balancer."""
    wanted = ctx.env.web_group().warm
    pool = ctx.state.warm_pool()
    fresh = [r for r in pool if r.release == release.id]
    leaving = [r.name for r in pool if r.release != release.id] + [r.name for r in fresh[wanted:]]
    done: dict[str, list[str]] = {}
    if leaving:
        with op.phase(f"retire {', '.join(leaving)}"):
            retire_web_servers(ctx, leaving)
        done["retired"] = leaving
    missing = wanted - len(fresh[:wanted])
    if missing > 0:
        with op.phase(f"warm {missing}"):
            records = reserve_web_servers(ctx, release, missing, warm=True)
            launch_or_remove_many(ctx, release, missing, in_service=False, reserved=records)
        done["warmed"] = [r.name for r in records]
    op.details.update(done)
    return done
