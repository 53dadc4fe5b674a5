"""Every command that changes an environment runs as an *operation*: it holds the environment's
lock while it runs and leaves one record in its history when it ends, however it ends.

    with operation(ctx, "promote") as op:
        op.details["from_primary"] = "db1"
        with op.phase("fence"):
            ...

Operations nest within one process (e.g. a restore that runs create's steps, a deploy that
builds its release): the inner one neither takes nor releases the lock, and records its own line
in the history.

`destroy` removes the directory that holds the lock: its operation is marked
(`op.removes_environment`), so that releasing the lock removes the then empty directory under
the same flock rather than leaving (or recreating) it; its history record is written beside the
directory (history.py), before the lock goes.
"""
from __future__ import annotations

import shlex
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict

from fabula.context import Context
from fabula.environment import history, lock, sharing
from fabula.environment.lock import Holder
from fabula.errors import FabulaError

OK, FAILED, INTERRUPTED = "ok", "failed", "interrupted"


def outcome_of(exc: BaseException | None) -> tuple[str, str | None]:
    if exc is None:
        return OK, None
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED, "interrupted (Ctrl-C)"
    if isinstance(exc, FabulaError):
        return FAILED, exc.message
    return FAILED, f"{type(exc).__name__}: {exc}"


def record_of(holder: Holder, outcome: str, error: str | None, ended: str | None = None,
              details: dict | None = None, phases: list[dict] | None = None,
              seconds: float | None = None) -> dict:
    """One line of the history: who ran what, when, its phases and how it ended."""
    return {"id": holder.id, "who": holder.owner, "pid": holder.pid, "started": holder.started,
            "ended": ended, "action": holder.action, "command": holder.command, "details": details or {},
            "phases": phases or [], "seconds": seconds, "outcome": outcome, "error": error}


class Operation:
    """One running operation: its details and phases, as its history record will show them."""

    def __init__(self, ctx: Context, holder: Holder):
        self.ctx, self.holder = ctx, holder
        self.details: dict = {}
        self.phases: list[dict] = []
        self._clock = time.monotonic()
        self._phases_lock = threading.Lock()  # phases may end in create's worker threads
        self.failure: str | None = None   # an operation that failed without an exception (fail())
        self.removes_environment = False  # destroy: the emptied directory goes with the lock

    @property
    def action(self) -> str:
        return self.holder.action

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.ctx.out.step(self.action, f"{name} ...")
        started = time.monotonic()
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            seconds = round(time.monotonic() - started, 2)
            with self._phases_lock:
                self.phases.append({"name": name, "seconds": seconds, "outcome": outcome_of(error)[0]})
            if error is None:
                self.ctx.out.step(self.action, f"{name} done in {seconds:.1f}s")

    def fail(self, message: str) -> None:
        """Record the operation as failed though it raises nothing (e.g. `manage`'s command
        exited non-zero, and its exit status is passed on)."""
        self.failure = message

    def record(self, exc: BaseException | None) -> dict:
        with self._phases_lock:
            phases = list(self.phases)
        outcome, error = outcome_of(exc)
        if exc is None and self.failure is not None:
            outcome, error = FAILED, self.failure
        return record_of(self.holder, outcome, error, ended=lock.now_iso(), details=self.details,
                         phases=phases, seconds=round(time.monotonic() - self._clock, 2))


def default_command() -> str:
    # argv[0] is a venv path or __main__.py; "fabula" is what the user would type again
    return shlex.join(["fabula", *sys.argv[1:]])


@contextmanager
def operation(ctx: Context, action: str, command: str | None = None, force: bool = False) -> Iterator[Operation]:
    """Take the environment's lock (FabulaError naming the holder if taken), yield an Operation,
    append its record to the history when the block ends (outcome "ok", "failed" with the
    error's message, or "interrupted" on KeyboardInterrupt), and release the lock on every exit.

    force (destroy --force): a lock held by another live command is broken rather than refused,
    with a warning and a record of whose it was."""
    command = command or default_command()
    # the lock lives in the environment's directory, which the first `create` makes
    ctx.paths.make_env_dir()
    holder = Holder.of_this_process(action, command)
    nested = acquire_waiting_for_autoscaler(ctx, holder, force)
    # the team's lock too, where operators on other machines share the environment
    store = None if nested else ctx.provider.shared_store()
    if store is not None:
        try:
            sharing.take(ctx, store, holder, asdict(holder), autoscaler=AUTOSCALER_ACTION, wait=AUTOSCALER_WAIT)
        except BaseException:
            release(ctx, holder)
            raise
    if not nested:
        ctx.state.reload(ctx.paths)  # another process may have changed the environment meanwhile
    op = Operation(ctx, holder)
    error: BaseException | None = None
    try:
        yield op
    except BaseException as exc:
        error = exc
        raise
    finally:
        try:
            history.append(ctx.paths, op.record(error))
        except OSError as exc:  # e.g. a full disk: say so, but keep the operation's own error
            ctx.out.warn(f"could not record {action} in {history.history_path(ctx.paths)}: {exc}")
        finally:
            try:
                if store is not None:
                    sharing.give_back(ctx, store, removed=op.removes_environment and error is None)
            finally:
                if not nested:
                    release(ctx, holder, remove_dir=op.removes_environment and error is None)


AUTOSCALER_ACTION = "autoscale"
AUTOSCALER_WAIT = 180  # the autoscaler holds the lock for one launch or retirement: seconds


def acquire_waiting_for_autoscaler(ctx: Context, holder: Holder, force: bool = False) -> bool:
    """acquire(), but a lock held by the autoscaler's change is waited for rather than refused."""
    deadline = time.monotonic() + AUTOSCALER_WAIT
    said = False
    while True:
        try:
            return acquire(ctx, holder, force)
        except FabulaError:
            try:
                current = lock.read(ctx.paths)
            except lock.Unreadable:
                raise
            autoscaling = current is not None and current.action == AUTOSCALER_ACTION
            if not autoscaling or holder.action == AUTOSCALER_ACTION or time.monotonic() > deadline:
                raise
            if not said:
                ctx.out.step(holder.action, "waiting for the autoscaler's change to finish")
                said = True
            time.sleep(0.5)


def locked_error(ctx: Context, holder: Holder, wanted: Holder | None = None) -> FabulaError:
    where = "" if holder.on_this_host() else \
        f" on another host ({holder.host}: fabula cannot tell from here whether it still runs)"
    fix = f"wait until that command ends; if it is no longer running: `fabula unlock {ctx.env_name}`"
    if wanted is not None and wanted.action == "destroy":
        fix += f"; or destroy anyway, breaking its lock: `fabula destroy {ctx.env_name} --yes --force`"
    return FabulaError(f"environment {ctx.env_name} is locked by {holder.describe()}{where}", fix)


def acquire(ctx: Context, holder: Holder, force: bool = False) -> bool:
    """Take the lock for `holder`; True if this process already held it (a nested operation)."""
    try:
        return _acquire(ctx, holder, force)
    except FileNotFoundError:
        # the directory went between our making it and locking it: a `destroy` ended meanwhile
        # (it removes the directory with its lock). This command starts afresh after it.
        ctx.paths.make_env_dir()
        return _acquire(ctx, holder, force)


def _acquire(ctx: Context, holder: Holder, force: bool) -> bool:
    with lock.guarded(ctx.paths):
        for _ in range(2):
            if lock.create_exclusively(ctx.paths, holder):
                return False
            try:
                current = lock.read(ctx.paths)
            except lock.Unreadable as exc:
                raise FabulaError(f"environment {ctx.env_name} is locked, but its lock file is unreadable "
                                  f"({exc})", f"if no fabula command is running on it: "
                                  f"`fabula unlock {ctx.env_name}`") from None
            if current is None:
                continue  # released between our attempt and the read
            if current.is_this_process():
                return True
            if not current.is_stale():
                if not force:
                    raise locked_error(ctx, current, holder)
                break_live(ctx, current, holder)
                continue
            take_over(ctx, current)
    raise FabulaError(f"could not take the lock of environment {ctx.env_name}",
                      f"try again; `fabula describe {ctx.env_name}` shows who holds it")


def take_over(ctx: Context, dead: Holder) -> None:
    """Remove a stale lock, warning, and record the dead operation as interrupted."""
    ctx.out.warn(f"taking over the stale lock of environment {ctx.env_name}: {dead.describe()} "
                 f"is no longer running (pid {dead.pid} has ended)")
    # the holder may have died after writing its record but before releasing the lock
    if not history.has_record(ctx.paths, dead.id):
        history.append(ctx.paths, record_of(dead, INTERRUPTED, f"pid {dead.pid} ended without releasing "
                                                          f"the lock (found at {lock.now_iso()})"))
    lock.lock_path(ctx.paths).unlink()


def break_live(ctx: Context, current: Holder, breaker: Holder) -> None:
    """--force: remove the lock of a command that still runs (called under lock.guarded), with a
    warning and a history record saying whose it was; that command, ending, warns that its lock
    was broken."""
    where = "" if current.on_this_host() else f" on {current.host}"
    ctx.out.warn(f"breaking the lock of environment {ctx.env_name} held by {current.describe()}{where} "
                 f"(--force): that command may still be changing it")
    lock.lock_path(ctx.paths).unlink()
    me = Holder.of_this_process("break lock", breaker.command)
    history.append(ctx.paths, record_of(me, OK, None, ended=me.started, details={"broken": asdict(current)},
                                        seconds=0))


def release(ctx: Context, holder: Holder, remove_dir: bool = False) -> None:
    """Release `holder`'s lock; remove_dir (destroy): then remove the environment's directory,
    emptied by the operation, in the same flock (a command waiting for it finds it gone and
    starts afresh: acquire())."""
    try:
        with lock.guarded(ctx.paths):
            removed = lock.remove_if(ctx.paths, holder.id)
            if removed and remove_dir:
                try:
                    ctx.paths.env_dir.rmdir()
                except OSError as exc:  # e.g. a command that ignored the lock wrote a file meanwhile
                    ctx.out.warn(f"could not remove {ctx.paths.env_dir}: {exc.strerror}")
    except FileNotFoundError:  # nothing left to unlock; but this command's work went with it
        ctx.out.warn(f"environment {ctx.env_name} was destroyed while this command ran "
                     "(`fabula destroy --force` broke its lock)")
        return
    if not removed:
        ctx.out.warn(f"the lock of environment {ctx.env_name} was broken while this command ran "
                     "(`fabula unlock`): another command may have changed it meanwhile")


def unlock(ctx: Context) -> tuple[Holder | None, bool]:
    """Break the lock whoever holds it, and record that in the history.

    Returns the holder (None if the lock file was unreadable) and whether there was a lock."""
    holder, existed = lock.break_lock(ctx.paths)
    if existed:
        me = Holder.of_this_process("unlock", default_command())
        broken = asdict(holder) if holder else "an unreadable lock file"
        history.append(ctx.paths, record_of(me, OK, None, ended=me.started, details={"broken": broken},
                                            seconds=0))
    return holder, existed
