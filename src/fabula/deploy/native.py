"""The web tier on a platform's own group (providers/base.py's NativeWebGroup: an Auto Scaling
group on AWS): the platform launches and terminates the web servers from one launch
configuration per release; fabula converges each over SSH with the same role code as on every
provider, and the state's web records follow the group's members (named by the platform).

Registration: the group stays attached to the load balancer's target group, so that what the
platform does on its own (a scale-in of its scaling policy, replacing an instance that fails its
health check) drains through the load balancer. But the group registers an instance as soon as
it is in service, before fabula has converged it; fabula takes each new member out at once and
puts it back only once it is converged (in a deploy, once the migrations ran too), then waits for
the load balancer's health check. So no request reaches a half-made server, nor new code before
its migrations, as with fabula's own group (deploy/group.py).

Retiring: the load balancer drains the member (no new requests; those in flight finish), then
the group terminates it with its desired count decremented, so it launches no replacement.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fabula.context import Context, Release
from fabula.deploy.group import DRAIN_TIMEOUT, wait_healthy
from fabula.environment.firewall import apply_firewalls
from fabula.errors import FabulaError
from fabula.maintenance import set_host, set_maintenance
from fabula.providers.base import Host, Member, NativeWebGroup
from fabula.roles import ROLES
from fabula.roles.worker import migrate
from fabula.state import ServerRecord
from fabula.supervisor import Supervisor

# an instance boots in a minute or two; a group short of capacity retries for longer
LAUNCH_TIMEOUT = 900.0


@contextmanager
def _on_release(ctx: Context, release: Release) -> Iterator[None]:
    previous, ctx.release = ctx.release, release
    try:
        yield
    finally:
        ctx.release = previous


def record_members(ctx: Context, members: list[Member]) -> None:
    """The state's web records are the group's members: a new one recorded (with its address),
    one the group no longer has (terminated, replaced) forgotten."""
    names = {m.name for m in members}
    for record in ctx.state.by_role("web"):
        if record.name not in names:
            ctx.state.servers.pop(record.name)
            ctx.hosts.pop(record.name, None)
    for member in members:
        record = ctx.state.servers.setdefault(member.name, ServerRecord(name=member.name, role="web"))
        record.address = member.address
    ctx.state.save(ctx.paths)


def take_out(ctx: Context, names: list[str]) -> None:
    """Out of the load balancer at once (they serve nothing yet: nothing to drain)."""
    lb = ctx.provider.load_balancer
    registered = set(lb.health())
    for name in names:
        if name in registered:
            lb.drain(name)


def put_in(ctx: Context, names: list[str]) -> None:
    """Into the load balancer, then in service once its health check passes."""
    registered = set(ctx.provider.load_balancer.health())
    for name in names:
        if name not in registered:
            ctx.provider.load_balancer.ready(name)
    wait_healthy(ctx, names)
    for name in names:
        ctx.out.step(name, "in service")


def prepare(ctx: Context, name: str) -> Host:
    """A member as every provider's server is before its role converges: the environment's
    users and tree, its role's packages, its supervisor."""
    host = ctx.provider.ensure_server(name, "web")
    ctx.provider.prepare_host(host, ROLES["web"].packages)
    ctx.hosts[name] = host
    Supervisor(host).ensure_running()
    return host


def converge(ctx: Context, name: str, release: Release) -> Host:
    host = ctx.host(name)
    with _on_release(ctx, release):
        ROLES["web"].converge(ctx, host)
    ctx.state.servers[name].release = release.id
    ctx.state.save(ctx.paths)
    return host


def bring_up(ctx: Context, group: NativeWebGroup, release: Release) -> list[Host]:
    """`create`'s web tier: the release's launch configuration, the group at its desired count,
    each member prepared (the caller converges them and puts them in service). A member not
    converged before is out of the load balancer until then; one that was (a second create)
    keeps serving while it converges again."""
    group.launch_from(release.id)
    members = group.wait_members(group.desired(), LAUNCH_TIMEOUT)
    new = [m.name for m in members if not (ctx.state.servers.get(m.name) and ctx.state.servers[m.name].release)]
    record_members(ctx, members)
    take_out(ctx, new)
    hosts = [prepare(ctx, m.name) for m in members]
    apply_firewalls(ctx)
    ctx.out.step("web group", f"{len(members)} instance(s) of the group: {', '.join(m.name for m in members)}")
    return hosts


def admit(ctx: Context, group: NativeWebGroup, count: int, release: Release) -> list[str]:
    """The group's members once it has `count`, recorded; each member new to fabula converged
    and put in service (`fabula scale`). The names of those converged."""
    return _admit(ctx, group.wait_members(count, LAUNCH_TIMEOUT), release)


def keep(ctx: Context, group: NativeWebGroup, release: Release) -> dict:
    """fabula's program on the platform host, once a round (autoscaling/controller.py): the
    members the group launched by itself (its scaling policy's, a replacement of an unhealthy
    one) converged and put in service; those it terminated forgotten."""
    members = group.in_service()
    gone = sorted({r.name for r in ctx.state.by_role("web")} - {m.name for m in members})
    take_out(ctx, gone)   # the group deregisters what it terminates; a target left behind goes too
    converged = _admit(ctx, members, release)
    return {"converged": converged, "forgotten": gone}


def _admit(ctx: Context, members: list[Member], release: Release) -> list[str]:
    new = [m.name for m in members if m.name not in ctx.state.servers]
    record_members(ctx, members)
    take_out(ctx, new)
    for name in new:
        prepare(ctx, name)
    if new:
        apply_firewalls(ctx)
    for name in new:
        converge(ctx, name, release)
    if new:
        put_in(ctx, new)
    return new


def launch_one(ctx: Context, group: NativeWebGroup, release: Release,
               then: Callable[[str], object] | None = None) -> str:
    """One more member, from the group's launch configuration (`release`'s), converged out of
    the load balancer; `then(name)` runs next. If either fails, the new member is terminated
    (the desired count back to what it was) and the error goes on to the caller."""
    before = set(group.members())
    group.set_desired(group.desired() + 1)
    members = group.wait_members(len(before) + 1, LAUNCH_TIMEOUT)
    new = [m for m in members if m.name not in before]
    if len(new) != 1:
        raise FabulaError(f"the web group launched {len(new)} instance(s) where fabula asked for one "
                          f"({', '.join(m.name for m in new) or 'none'}): something else changed it meanwhile",
                          f"see `fabula describe {ctx.env_name}`, then run the command again")
    name = new[0].name
    record_members(ctx, members)
    try:
        take_out(ctx, [name])
        prepare(ctx, name)
        apply_firewalls(ctx)
        ctx.out.step(name, f"launched from release {release.id} at {new[0].address}")
        converge(ctx, name, release)
        if then is not None:
            then(name)
    except Exception:
        try:
            retire(ctx, group, name)
        except Exception as cleanup:  # noqa: BLE001 - report the launch's error, not this one
            ctx.out.warn(f"could not remove the failed web server {name}: {cleanup}")
        raise
    return name


def retire(ctx: Context, group: NativeWebGroup, name: str) -> None:
    """Drain a member out of the load balancer, then terminate it with the desired count
    decremented (the group launches no replacement)."""
    lb = ctx.provider.load_balancer
    if name in lb.health():
        lb.drain(name)
        ctx.out.step(name, "draining")
        if not lb.wait_drained(name, DRAIN_TIMEOUT):
            ctx.out.warn(f"{name} still serves requests after {DRAIN_TIMEOUT:.0f}s of draining: they are cut")
    group.terminate(name)
    ctx.state.servers.pop(name, None)
    ctx.hosts.pop(name, None)
    ctx.state.save(ctx.paths)
    ctx.out.step(name, "terminated")


def _stopped(ctx: Context, group: NativeWebGroup, new: Release, old: Release | None, exc: Exception) -> FabulaError:
    """The group launches from the old release again; the error for the deploy's caller."""
    back = ""
    if old is not None:
        try:
            group.launch_from(old.id)
        except Exception as cleanup:  # noqa: BLE001 - reported with the deploy's own error
            back = f"; the group could not be pointed back at release {old.id} ({cleanup})"
    return FabulaError(f"deploy of release {new.id} stopped: {exc}\nthe new server was removed; the site still "
                       f"serves release {ctx.state.release}{back}",
                       f"fix the release and deploy again; `fabula history {ctx.env_name}` shows what ran")


def serial(ctx: Context, op, group: NativeWebGroup, new: Release, old_members: list[str],
           migrate_and_update_workers: Callable[[Context, Release, Release | None, object], None]) -> None:
    """The group launches from `new`; then, for each old member, one more from `new` (desired
    +1) converged, the first one's migrations and worker, in service, and the old one drained
    and terminated (desired -1)."""
    old = ctx.release
    group.launch_from(new.id)
    for index, retiring in enumerate(old_members):
        with op.phase(f"replace {retiring}"):
            def into_service(name: str, first: bool = index == 0) -> None:
                if first:  # the new code is converged: now the migrations and the worker, once
                    with op.phase("migrations and worker"):
                        migrate_and_update_workers(ctx, new, old, ctx.state.servers[name])
                put_in(ctx, [name])
            try:
                launch_one(ctx, group, new, then=into_service)
            except Exception as exc:
                raise _stopped(ctx, group, new, old, exc) from exc
            retire(ctx, group, retiring)


def full(ctx: Context, op, group: NativeWebGroup, new: Release, old_members: list[str],
         update_workers: Callable[[Context, Release], None]) -> None:
    """Under the upgrade page: as many new members as old ones, converged out of the load
    balancer (the page on them too), the migrations and the worker, then the swap."""
    old = ctx.release
    set_maintenance(ctx, True)
    try:
        group.launch_from(new.id)
        new_members: list[str] = []
        with op.phase("new web servers"):
            for _ in old_members:
                try:
                    new_members.append(launch_one(ctx, group, new, then=lambda n: set_host(ctx.host(n), True)))
                except Exception as exc:
                    raise _stopped(ctx, group, new, old, exc) from exc
        with op.phase("migrations and worker"):
            if ctx.state.by_role("worker"):
                update_workers(ctx, new)
            else:
                with _on_release(ctx, new):
                    migrate(ctx, ctx.host(new_members[0]))
        with op.phase("swap"):
            put_in(ctx, new_members)
            for name in old_members:
                retire(ctx, group, name)
    finally:
        set_maintenance(ctx, False)
