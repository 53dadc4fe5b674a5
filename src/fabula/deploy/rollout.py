"""`fabula deploy` and `fabula rollback`: a new release onto the web group and the worker.

serial: the worker first (migrations, Celery restarted warmly), then each web server replaced
in turn: a new one from the new release is healthy in the load balancer before an old one
drains and goes, so old and new code serve side by side. Only for migrations that the old
code does not notice (additive ones).
full (FabulAWS's full deployment): the upgrade page everywhere, all new web servers brought up
out of rotation, migrations on the worker, then the load balancer swapped to the new servers
and the page removed. For anything else.
With neither flag, the new release's migration plan against the database decides.
"""
from __future__ import annotations

import copy
import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fabula import release as releases
from fabula.context import Context, Release
from fabula.deploy import in_place, native
from fabula.deploy.group import (
    bring_into_service,
    launch_or_remove_many,
    reserve_web_servers,
    retire_web_servers,
    set_backends,
    wait_healthy,
    web_names,
)
from fabula.deploy.releases import build_release, resolve_revision
from fabula.environment.audit import operation
from fabula.errors import FabulaError
from fabula.maintenance import set_host, set_maintenance
from fabula.roles import ROLES, appserver
from fabula.roles.worker import Worker, migrate
from fabula.state import ServerRecord

PLAN_SCRIPT = Path(__file__).resolve().parent.parent / "runtime" / "fabula_migration_plan.py"


@dataclass
class DeployPlan:
    from_release: str | None
    to_release: str
    strategy: str
    reason: str
    migrations: list[dict] = field(default_factory=list)
    replace: list[str] = field(default_factory=list)
    worker: str | None = None


def migration_host(ctx: Context):
    records = ctx.state.by_role("worker") or ctx.state.by_role("web")
    return ctx.host(records[0].name)


def migration_plan(ctx: Context, new: Release) -> list[dict]:
    """The migrations `new` would apply, each operation marked additive or not (run on the
    worker, with the new release's code, against the live database; changes nothing)."""
    host = migration_host(ctx)
    path = appserver.put_release(host, new)
    script = host.path("tmp", "fabula_migration_plan.py")
    host.make_dirs([host.path("tmp")])  # root's: the app's user only reads the script
    host.put_file(script, PLAN_SCRIPT.read_bytes())
    env = {**appserver.app_environment(ctx, host), "PYTHONPATH": str(path / "code"), "FABULA_RELEASE": new.id}
    result = host.check([str(path / "venv" / "bin" / "python"), str(script)], user=host.accounts.app, env=env,
                        timeout=300)
    return json.loads(result.stdout.strip().splitlines()[-1])


def plan_while_launching(ctx: Context, new: Release, requested: str | None,
                         own_group: bool) -> tuple[DeployPlan, Launch | None]:
    """The deploy's plan, and on fabula's own web group (`own_group`, not a fixed inventory) the
    new web servers it needs, launched while the plan is read (a Django start-up on the worker,
    seconds under load): serial and full deploys both begin with as many new servers as there are
    old ones, out of rotation. If the plan fails (a serial deploy refused), they go."""
    old_servers = web_names(ctx)
    launch = None
    if own_group and not ctx.env.fixed_inventory and old_servers:
        ctx.out.step("deploy", f"launching {len(old_servers)} web server(s) from {new.id} "
                               "while the migration plan is read")
        launch = Launch(ctx, new, len(old_servers))
    try:
        return plan_deploy(ctx, new, requested, old_servers), launch
    except BaseException:
        if launch:
            launch.remove()
        raise


def choose(plan: list[dict], requested: str | None) -> tuple[str, str]:
    unsafe = [(m["migration"], op) for m in plan for op in m["operations"] if not op["additive"]]
    if unsafe:
        name, op = unsafe[0]
        why = f"migration {name} is not backwards-compatible: {op['description']} ({op['why']})"
        if requested == "serial":
            raise FabulaError(f"a serial deploy would run the old code on the new schema, but {why}; "
                              "nothing was changed", "deploy with --full (the upgrade page is shown meanwhile)")
        return requested or "full", why
    if requested:
        return requested, f"{requested} requested"
    count = sum(len(m["operations"]) for m in plan)
    return "serial", (f"{count} additive migration operation(s): old and new code can share the schema"
                      if count else "no migrations")


def plan_deploy(ctx: Context, new: Release, requested: str | None, replace: list[str] | None = None) -> DeployPlan:
    """`replace`: the web servers the deploy replaces (default: the group's members now)."""
    migrations = migration_plan(ctx, new)
    strategy, reason = choose(migrations, requested)
    worker = ctx.state.by_role("worker")
    return DeployPlan(ctx.state.release, new.id, strategy, reason, migrations,
                      web_names(ctx) if replace is None else replace, worker[0].name if worker else None)


def update_workers(ctx: Context, new: Release, migrated: threading.Event | None = None) -> None:
    """Migrations (then `migrated` is set), then Celery restarted on the new release: the old
    worker stops taking tasks and finishes those in flight (tasks are acknowledged after
    completion, so one cut by a crash runs again)."""
    role = ROLES["worker"]
    assert isinstance(role, Worker)
    with using_release(ctx, new):
        records = ctx.state.by_role("worker")
        moved = {record.name: role.migrate_here(ctx, ctx.host(record.name)) for record in records}
        if migrated is not None:
            migrated.set()
        for record in records:
            role.start_celery(ctx, ctx.host(record.name), moved[record.name])
            record.release = new.id
    ctx.state.save(ctx.paths)


@contextmanager
def using_release(ctx: Context, release: Release):
    """Roles configure servers for ctx.release: point it at `release` for a while."""
    previous, ctx.release = ctx.release, release
    try:
        yield
    finally:
        ctx.release = previous


def launch_or_clean_up(ctx: Context, new: Release, then=None, count: int = 1) -> list:
    """`count` new web servers from `new`, healthy on their own (out of rotation); `then(records)`
    runs next. If either fails, the new servers are removed and the site keeps its release."""
    try:
        return launch_or_remove_many(ctx, new, count, in_service=False, then=then)
    except Exception as exc:
        raise stopped(ctx, new, exc) from exc


class Launch:
    """`count` new web servers launched from `new`, out of rotation, in a thread of their own,
    while the caller goes on (reads the migration plan, runs the worker's side). Their records are
    in the state before the thread starts (destroy finds them after a crash), and the thread has
    a context of its own, so that the caller's `using_release` and the launch's do not cross."""

    def __init__(self, ctx: Context, new: Release, count: int):
        self.ctx, self.new = ctx, new
        self.reserved = reserve_web_servers(ctx, new, count)
        own = copy.copy(ctx)
        own.release = new
        pool = ThreadPoolExecutor(max_workers=1)
        self._future: Future[list[ServerRecord]] = pool.submit(
            launch_or_remove_many, own, new, count, False, None, self.reserved)
        pool.shutdown(wait=False)   # the thread ends with the launch

    def _result(self) -> list[ServerRecord]:
        try:
            return self._future.result()
        except (KeyboardInterrupt, SystemExit):
            # interrupted while waiting: the launch finishes first (its servers are in the state,
            # for the next create or destroy), so that the lock is not let go while it runs
            wait([self._future])
            raise

    def records(self) -> list[ServerRecord]:
        """The new servers, healthy on their own, once launched; if the launch failed, its error,
        as the deploy's (the servers are removed: the site keeps its release)."""
        try:
            return self._result()
        except Exception as exc:
            raise stopped(self.ctx, self.new, exc) from exc

    def remove(self) -> None:
        """The deploy stopped before they took traffic: once launched, they go."""
        try:
            records = self._result()
        except Exception:   # noqa: BLE001 - a failed launch removed its servers itself
            return
        retire_web_servers(self.ctx, [r.name for r in records])


def stopped(ctx: Context, new: Release, exc: Exception) -> FabulaError:
    """The error of a deploy whose new servers were removed again: the site keeps its release."""
    return FabulaError(f"deploy of release {new.id} stopped: {exc}\n"
                       f"the new server(s) were removed; the site still serves release {ctx.state.release}",
                       f"fix the release and deploy again; `fabula history {ctx.env_name}` shows what ran")


def serial(ctx: Context, op, new: Release, old_servers: list[str], surge: int | None = None,
           launch: Launch | None = None) -> None:
    """New web servers beside the old ones, `surge` at a time (default: as many as there are
    old ones, launched at once, as an autoscaling group's maximum surge): each batch healthy and in
    service, then as many old ones drained together and removed. The migrations and the worker
    run once, when the first new servers are healthy and before they take traffic. `launch`: the
    first batch, already under way."""
    old = ctx.release
    surge = surge or len(old_servers)
    for start in range(0, len(old_servers), surge):
        retiring = old_servers[start:start + surge]
        with op.phase(f"replace {', '.join(retiring)}"):
            if start == 0:
                first = launch or Launch(ctx, new, len(retiring))
                if ctx.state.by_role("worker"):
                    beside_the_worker(ctx, op, new, old, first)
                else:
                    into_service_after_migrations(ctx, op, new, old, first)
            else:
                launch_or_clean_up(ctx, new, then=lambda records: bring_into_service(ctx, [r.name for r in records]),
                                   count=len(retiring))
            retire_web_servers(ctx, retiring)


def into_service_after_migrations(ctx: Context, op, new: Release, old: Release | None, launch: Launch) -> None:
    """Without a worker: the migrations on the first new server, once healthy, then the new
    servers in service; if either fails, they go."""
    records = launch.records()
    try:
        with op.phase("migrations"):
            migrate_and_update_workers(ctx, new, old, records[0])
        bring_into_service(ctx, [r.name for r in records])
    except Exception as exc:
        retire_web_servers(ctx, [r.name for r in records])
        raise stopped(ctx, new, exc) from exc


def beside_the_worker(ctx: Context, op, new: Release, old: Release | None, launch: Launch) -> None:
    """The first new web servers (`launch`, under way) come up while the worker runs the
    migrations and restarts Celery on the new release (each takes seconds). They take traffic
    once the migrations are done; the old ones leave once Celery runs the new release too. If the
    worker's side fails, the new servers are removed (the old ones still serve) and the worker goes
    back to the old release."""
    migrated = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool, using_release(ctx, new):
        def worker_side() -> None:
            with op.phase("migrations and worker"):
                migrate_and_update_workers(ctx, new, old, None, migrated)
        worker = pool.submit(worker_side)
        try:
            records = launch.records()
            try:
                while not migrated.wait(0.1):
                    if worker.done():
                        worker.result()   # its error (the worker is back on the old release) stops the deploy
                        break
                bring_into_service(ctx, [r.name for r in records])
            except Exception as exc:
                retire_web_servers(ctx, [r.name for r in records])
                raise stopped(ctx, new, exc) from exc
        except Exception:
            # the launch failed, perhaps while the worker went on to the new release: back with it
            if worker.exception() is None and old is not None:
                update_workers(ctx, old)
            raise
        try:
            worker.result()
        except Exception as exc:   # Celery did not start on the new release: the new servers go
            retire_web_servers(ctx, [r.name for r in records])
            raise stopped(ctx, new, exc) from exc


def migrate_and_update_workers(ctx: Context, new: Release, old: Release | None, record,
                               migrated: threading.Event | None = None) -> None:
    try:
        if ctx.state.by_role("worker"):
            update_workers(ctx, new, migrated)
        else:
            with using_release(ctx, new):
                migrate(ctx, ctx.host(record.name))
    except Exception:
        # the web group stays on the old release, and so does the worker (the migrations that
        # ran, if any, were backwards-compatible ones)
        if old is not None:  # None: the old release is no longer on disk, nothing to go back to
            update_workers(ctx, old)
        raise


def full(ctx: Context, op, new: Release, old_servers: list[str], launch: Launch | None = None) -> None:
    """`launch`: the new web servers, already under way."""
    launch = launch or Launch(ctx, new, len(old_servers))
    try:
        set_maintenance(ctx, True, old_servers)
    except BaseException:
        launch.remove()
        raise
    try:
        with op.phase("new web servers"):
            records = launch.records()
            new_servers = [r.name for r in records]
            try:   # the upgrade page on the new servers too, until the swap
                for name in new_servers:
                    set_host(ctx.host(name), True)
            except Exception as exc:
                retire_web_servers(ctx, new_servers)
                raise stopped(ctx, new, exc) from exc
        with op.phase("migrations and worker"):
            if ctx.state.by_role("worker"):
                update_workers(ctx, new)
            else:
                with using_release(ctx, new):
                    migrate(ctx, ctx.host(new_servers[0]))
        with op.phase("swap"):
            set_backends(ctx, old_servers + new_servers)
            wait_healthy(ctx, new_servers)
            retire_web_servers(ctx, old_servers)
    finally:
        set_maintenance(ctx, False)


def require_created(ctx: Context) -> str:
    """The group's release; an error if the environment has not been created."""
    if not ctx.state.release:
        raise FabulaError(f"{ctx.env_name} has not been created", f"run `fabula create {ctx.env_name}` first")
    return ctx.state.release


def require_built(ctx: Context, release_id: str) -> Release:
    """A release built before; an error naming it if it is not (or no longer) on disk."""
    found = releases.load(ctx, release_id)
    if found is None:
        raise FabulaError(f"release {release_id} is not built (or no longer on disk)", "see `fabula release list`")
    return found


def deploy(ctx: Context, rev: str | None = None, requested: str | None = None, plan_only: bool = False,
           release_id: str | None = None, action: str = "deploy") -> DeployPlan:
    require_created(ctx)  # and again under the lock: nothing is locked nor recorded for nothing
    if rev is not None or not release_id:
        resolve_revision(ctx, rev or "HEAD")  # a bad revision is refused before the lock is taken
    if plan_only:
        # it builds the release if need be and installs it on the worker to read its migrations:
        # changes of the environment's files, so under the lock too (and recorded)
        with operation(ctx, f"{action} plan") as op:
            ctx.release = releases.load(ctx, require_created(ctx))
            new = require_built(ctx, release_id) if release_id else build_release(ctx, rev or "HEAD")[0]
            plan = plan_deploy(ctx, new, requested)
            op.details.update(from_release=plan.from_release, to_release=new.id, strategy=plan.strategy,
                              reason=plan.reason)
        return plan
    with operation(ctx, action) as op:
        # built (a nested operation: its own record) and planned under the lock, from the state
        # as it is now (the autoscaler may have changed it)
        ctx.release = releases.load(ctx, require_created(ctx))
        new = require_built(ctx, release_id) if release_id else build_release(ctx, rev or "HEAD")[0]
        group = ctx.provider.web_group(ctx)
        plan, launch = plan_while_launching(ctx, new, requested, own_group=group is None)
        op.details.update(from_release=plan.from_release, to_release=new.id, strategy=plan.strategy,
                          reason=plan.reason)
        if not plan.migrations:
            # the plan was read from the live database just now, under the lock: it already has every
            # migration of `new`, and `manage.py migrate` (a Django start-up, seconds under load)
            # would apply none
            ctx.state.migrated_release = new.id
        ctx.out.step("deploy", f"{plan.strategy} deploy of {new.id}: {plan.reason}"
                     + (" (in place: a fixed inventory)" if ctx.env.fixed_inventory else ""))
        if ctx.env.fixed_inventory:  # the web group cannot make servers: each host takes the release
            if plan.strategy == "serial":
                in_place.serial(ctx, op, new, plan.replace, migrate_and_update_workers)
            else:
                in_place.full(ctx, op, new, plan.replace, update_workers)
        elif group is not None:  # the platform's own group launches the new servers from `new`'s template
            if plan.strategy == "serial":
                native.serial(ctx, op, group, new, plan.replace, migrate_and_update_workers)
            else:
                native.full(ctx, op, group, new, plan.replace, update_workers)
        elif plan.strategy == "serial":
            serial(ctx, op, new, plan.replace, launch=launch)
        else:
            full(ctx, op, new, plan.replace, launch)
        if plan.from_release != new.id:
            ctx.state.previous_release = plan.from_release
        ctx.state.release = new.id
        ctx.state.save(ctx.paths)
        ctx.release = new
    ctx.out.step("deploy", f"release {new.id} serves on {', '.join(web_names(ctx))}")
    return plan


def rollback(ctx: Context) -> DeployPlan:
    previous = ctx.state.previous_release
    if not previous or releases.load(ctx, previous) is None:
        raise FabulaError(f"{ctx.env_name} has no previous release to return to", "see `fabula release list`")
    return deploy(ctx, requested="serial", release_id=previous, action="rollback")


def plan_report(plan: DeployPlan) -> dict:
    return asdict(plan)
