"""`fabula db promote` and `fabula db reset-replicas`.

Planned failover (the primary answers): pause the app servers' PgBouncers (the app's queries
wait, those in flight finish), fence the primary (a clean shutdown, after which it takes no
write), wait until the replica has replayed everything the primary wrote up to its shutdown
checkpoint, promote, repoint the PgBouncers and resume them: the app waits, it does not fail.
Emergency (the primary does not answer): promote the replica and fence the old primary so that
it can never come back as a second primary. Either way every PgBouncer is then repointed and the
old primary waits, admitting no one, to be rebuilt as a replica by `reset-replicas`. No step is
left to the operator.
"""
from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator

from fabula.context import Context
from fabula.db.status import query, server_status
from fabula.db.topology import app_hosts, apply_synchronous, repoint_app_servers
from fabula.environment.audit import operation
from fabula.environment.firewall import apply_firewalls
from fabula.errors import FabulaError
from fabula.parallel import at_once
from fabula.providers.base import poll
from fabula.roles import ROLES, postgres
from fabula.supervisor import Supervisor, Unavailable

# how long a planned failover waits for the app's transactions in flight to finish
PAUSE_TIMEOUT = 5.0


def choose_replica(ctx: Context, name: str | None) -> str:
    candidates = [r.name for r in ctx.state.serving_replicas()]
    if name and name not in candidates:
        raise FabulaError(f"{name} is not a serving replica of {ctx.env_name}",
                          f"replicas: {', '.join(candidates) or 'none'}")
    for candidate in ([name] if name else candidates):
        status = server_status(ctx, candidate)
        if status.get("up") and status.get("in_recovery"):
            return candidate
    raise FabulaError(f"no healthy replica to promote in {ctx.env_name} (nothing was changed)",
                      f"`fabula db status {ctx.env_name}` shows the replicas; "
                      f"`fabula db reset-replicas {ctx.env_name}` rebuilds them")


def lsn_value(lsn: str) -> int:
    high, low = lsn.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def shutdown_checkpoint(ctx: Context, name: str) -> int:
    host = ctx.host(name)
    out = host.check([str(postgres.PG_BIN / "pg_controldata"), str(postgres.data_dir(host))],
                     user=host.accounts.db).stdout
    state = re.search(r"Database cluster state:\s+(.+)", out)
    checkpoint = re.search(r"Latest checkpoint location:\s+(\S+)", out)
    if state is None or checkpoint is None:
        raise FabulaError(f"{name}: pg_controldata's output has no cluster state or checkpoint location:\n{out}")
    if state.group(1).strip() != "shut down":
        raise FabulaError(f"{name}: PostgreSQL did not shut down cleanly ({state.group(1).strip()})")
    return lsn_value(checkpoint.group(1))


def fence(ctx: Context, name: str) -> list[str]:
    """Make sure a former primary cannot take writes again; return what could not be done. A host
    that does not answer (ssh: down, or cut off) is fenced by what the others do: the state marks
    it for rebuilding, and every PgBouncer is repointed away from it."""
    try:
        return _fence_host(ctx, name)
    except FabulaError as exc:
        ctx.state.servers[name].rebuild = True
        ctx.state.servers[name].role = "db-replica"
        ctx.state.save(ctx.paths)
        return [f"its host does not answer ({exc.message}): no app server connects to it any more; when it is "
                f"back, stop its PostgreSQL and run `fabula db reset-replicas {ctx.env_name}`"]


def _fence_host(ctx: Context, name: str) -> list[str]:
    host = ctx.host(name)
    problems = []
    supervisor = Supervisor(host)
    with contextlib.suppress(Unavailable):   # a host switched off: fenced by its firewall below
        supervisor.stop("postgresql", timeout=90)
    # without its program, nothing restarts it; with standby.signal, were it started anyway it
    # would come up read-only; `rebuild` keeps create from treating it as a primary
    host.run(["rm", "-f", str(supervisor.programs_dir / "postgresql.conf")])
    with contextlib.suppress(Unavailable):
        supervisor.update()
    if postgres.is_initialized(host):
        host.run(["touch", str(postgres.data_dir(host) / "standby.signal")], user=host.accounts.db)
    ctx.state.servers[name].rebuild = True
    ctx.state.servers[name].role = "db-replica"
    ctx.state.save(ctx.paths)
    try:
        ctx.provider.apply_firewall(host, [])
    except FabulaError as exc:
        problems.append(f"firewall: {exc}")
    if host.run([str(postgres.PG_BIN / "pg_isready"), "-q", "-h", str(postgres.socket_dir(host))]).ok:
        problems.append("PostgreSQL still answers")
    return problems


def promote(ctx: Context, replica: str | None = None) -> dict:
    old = ctx.state.require("db-primary").name
    new = choose_replica(ctx, replica)
    with operation(ctx, "db promote") as op:
        op.details.update(from_primary=old, to_primary=new)
        result = _promote(ctx, old, new, op)
        op.details["planned"] = result["planned"]
        return result


def _promote(ctx: Context, old: str, new: str, op) -> dict:
    primary_status = server_status(ctx, old)
    planned = bool(primary_status.get("up")) and not primary_status.get("in_recovery")
    started = time.monotonic()
    with contextlib.ExitStack() as paused:
        if planned:
            with op.phase("pause the app"):
                paused.enter_context(app_waiting(ctx, old))
            ctx.out.step(old, "planned failover: fencing the primary (clean shutdown)")
            with op.phase("fence and catch up"):
                Supervisor(ctx.host(old)).stop("postgresql", timeout=120)
                final = shutdown_checkpoint(ctx, old)
                wait_replayed(ctx, new, final, old)
        else:
            ctx.out.step(old, "the primary does not answer: emergency failover")
            if not ctx.env.db.synchronous:
                ctx.out.warn("asynchronous replication: writes the replica had not received are lost "
                             "(db.synchronous: true prevents this)")
        problems = fence(ctx, old)
        ctx.out.step(old, "fenced: takes no writes, admits no connections, waits for reset-replicas")
        ctx.out.step(new, "promoting")
        with op.phase("promote"):
            promoted = query(ctx, new, "SELECT pg_promote(true, 60)")
        if not promoted or promoted[0][0] != "t":
            raise FabulaError(f"{new}: pg_promote did not complete",
                              f"see `fabula logs {ctx.env_name} {new} postgresql`")
        ctx.state.servers[new].role = "db-primary"
        ctx.state.sync_standbys = []
        ctx.state.save(ctx.paths)
        # the app's writes first (then they resume): the promoted replica already admits the app
        # servers (its firewall and pg_hba let them read), so they are repointed before the rest
        with op.phase("repoint"):
            repoint_app_servers(ctx)
    # then the new primary as a primary: its config, replication slots for the others, the app's roles
    with op.phase("primary"):
        ROLES["db-primary"].converge(ctx, ctx.host(new))
        apply_firewalls(ctx)
        apply_synchronous(ctx)
    seconds = time.monotonic() - started
    ctx.out.step("db", f"{new} is the primary ({'planned' if planned else 'emergency'}, {seconds:.1f}s)")
    for problem in problems:
        ctx.out.warn(f"{old}: fencing incomplete: {problem}")
    return {"old_primary": old, "new_primary": new, "planned": planned, "seconds": round(seconds, 2)}


@contextlib.contextmanager
def app_waiting(ctx: Context, primary: str, timeout: float = PAUSE_TIMEOUT) -> Iterator[None]:
    """Every app server's PgBouncer paused (SIGUSR1: PAUSE) until the block ends (SIGUSR2:
    RESUME): its clients' queries wait instead of failing, and the transactions in flight finish
    before the primary shuts down rather than being cut by it. Waits until the primary has no
    session of the app left, for `timeout` seconds at most: a session that lasts longer (a long
    Celery task) is cut, as it would be without the pause."""
    hosts = app_hosts(ctx)
    try:
        at_once(hosts, lambda h: Supervisor(h).signal("pgbouncer", "USR1"), name=lambda h: h.name)

        def app_sessions() -> int:
            rows = query(ctx, primary, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'")
            return int(rows[0][0]) if rows else 0
        if not poll(lambda: app_sessions() == 0, timeout, interval=0.05):
            ctx.out.warn(f"{primary}: the app's sessions still open after {timeout:.0f}s of pause are cut")
        ctx.out.step("db", f"the app's PgBouncers paused on {len(hosts)} server(s): its queries wait")
        yield
    finally:
        for host in hosts:   # each one, even if another does not answer
            try:
                Supervisor(host).signal("pgbouncer", "USR2")
            except (FabulaError, Unavailable) as exc:
                ctx.out.warn(f"{host.name}: PgBouncer not resumed ({exc}): run `fabula create {ctx.env_name}`")
        ctx.out.step("db", "the app's PgBouncers resumed")


def wait_replayed(ctx: Context, replica: str, target: int, old: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rows = query(ctx, replica, "SELECT pg_last_wal_replay_lsn()")
        if rows and rows[0][0] and lsn_value(rows[0][0]) >= target:
            return
        if time.monotonic() > deadline:
            # the replica is behind: bring the primary back rather than lose writes
            with contextlib.suppress(Unavailable, FabulaError):   # the error below says what to do
                Supervisor(ctx.host(old)).start("postgresql")
            raise FabulaError(f"{replica} has not replayed the primary's last writes after {timeout:.0f}s; "
                              f"{old} was restarted as the primary and nothing was changed",
                              f"check `fabula db status {ctx.env_name}`")
        time.sleep(0.1)


def reset_replicas(ctx: Context) -> None:
    """Rebuild every replica from the current primary (a former primary becomes a replica)."""
    primary = ctx.host(ctx.state.require("db-primary").name)
    replicas = ctx.state.by_role("db-replica")
    if not replicas:
        raise FabulaError(f"{ctx.env_name} has no replica", "set servers.db-replica in fabula.yml and run create")
    with operation(ctx, "db reset-replicas") as op:
        op.details["replicas"] = [r.name for r in replicas]
        _rebuild(ctx, primary, replicas)


def _rebuild(ctx: Context, primary, replicas) -> None:
    for record in replicas:
        record.rebuild = True
    ctx.state.sync_standbys = []
    ctx.state.save(ctx.paths)
    apply_firewalls(ctx)         # a fenced former primary may reach the primary for its base backup
    apply_synchronous(ctx)       # commits must not wait for replicas being rebuilt
    repoint_app_servers(ctx)     # reads go to the primary meanwhile
    for record in replicas:
        # a fresh slot, so the primary keeps WAL from the new base backup on, not from long ago
        postgres.psql(primary, f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                               f"WHERE slot_name = '{postgres.slot_name(record.name)}' AND NOT active")
    ROLES["db-primary"].converge(ctx, primary)   # creates the replicas' slots
    for record in replicas:
        host = ctx.host(record.name)
        Supervisor(host).ensure_running()
        ROLES["db-replica"].converge(ctx, host)
    apply_firewalls(ctx)
    apply_synchronous(ctx)
    repoint_app_servers(ctx)
