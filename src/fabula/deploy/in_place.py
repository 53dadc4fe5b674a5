"""Deploys on a fixed inventory (`provider: ssh`): the web group cannot make servers, so each web
host takes the new release in place.

serial: one web host at a time is drained out of the load balancer (the others serve; requests
in flight finish), its gunicorn restarted on the new release and health-checked on the host, then
put back in service; after the first host proves the new code healthy, the migrations run and
the worker moves (as in the serial deploy with new servers). A host whose new release fails goes
back to the old one and into service before the error is reported.
full: the upgrade page on every web host, the migrations and the worker, every web host on the
new release (under the page), their health checked, and the page removed.
"""
from __future__ import annotations

from collections.abc import Callable

from fabula.context import Context, Release
from fabula.deploy.group import DRAIN_TIMEOUT, wait_healthy
from fabula.errors import FabulaError
from fabula.maintenance import set_maintenance
from fabula.roles import ROLES
from fabula.roles.worker import migrate


def converge_web(ctx: Context, name: str, release: Release) -> None:
    """The web host `name` on `release` (gunicorn restarted on it), healthy on the host itself."""
    previous, ctx.release = ctx.release, release
    try:
        ROLES["web"].converge(ctx, ctx.host(name))
    finally:
        ctx.release = previous
    ctx.state.servers[name].release = release.id
    ctx.state.save(ctx.paths)


def take_out(ctx: Context, name: str) -> None:
    lb = ctx.provider.load_balancer
    lb.drain(name)
    ctx.out.step(name, "draining")
    if not lb.wait_drained(name, DRAIN_TIMEOUT):
        ctx.out.warn(f"{name} still serves requests after {DRAIN_TIMEOUT:.0f}s of draining: they are cut")


def put_back(ctx: Context, name: str) -> None:
    ctx.provider.load_balancer.ready(name)
    wait_healthy(ctx, [name])
    ctx.out.step(name, "in service")


def serial(ctx: Context, op, new: Release, names: list[str],
           migrate_and_update_workers: Callable[[Context, Release, Release | None, object], None]) -> None:
    old = ctx.release
    if len(names) < 2:
        ctx.out.warn("one web host: while it restarts on the new release, requests wait in the load balancer "
                     "(up to its timeout); a second web host serves them instead")
    for index, name in enumerate(names):
        with op.phase(f"update {name}"):
            take_out(ctx, name)
            try:
                converge_web(ctx, name, new)
                if index == 0:  # the new code is healthy: now the migrations and the worker, once
                    with op.phase("migrations and worker"):
                        migrate_and_update_workers(ctx, new, old, ctx.state.servers[name])
            except Exception as exc:
                back = _restore(ctx, name, old)
                raise FabulaError(f"deploy of release {new.id} stopped on {name}: {exc}\n{back}",
                                  f"fix the release and deploy again; `fabula history {ctx.env_name}` shows "
                                  "what ran") from exc
            put_back(ctx, name)


def _restore(ctx: Context, name: str, old: Release | None) -> str:
    """The host back on the old release and in service; what happened, for the error message."""
    if old is None:
        return f"{name} stays out of service: the old release is no longer on disk"
    try:
        converge_web(ctx, name, old)
        put_back(ctx, name)
    except Exception as exc:  # noqa: BLE001 - reported with the deploy's own error
        return f"{name} could not go back to release {old.id} ({exc}): it stays out of service"
    return f"{name} is back on release {old.id}, in service; the site still serves release {old.id}"


def full(ctx: Context, op, new: Release, names: list[str],
         update_workers: Callable[[Context, Release], None]) -> None:
    set_maintenance(ctx, True)
    try:
        with op.phase("migrations and worker"):
            if ctx.state.by_role("worker"):
                update_workers(ctx, new)
            else:
                converge_web(ctx, names[0], new)
                previous, ctx.release = ctx.release, new
                try:
                    migrate(ctx, ctx.host(names[0]))
                finally:
                    ctx.release = previous
        with op.phase("web hosts"):
            for name in names:
                converge_web(ctx, name, new)
            wait_healthy(ctx, names)
    finally:
        set_maintenance(ctx, False)
