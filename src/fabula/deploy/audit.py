"""Every command that changes an environment runs as an *operation*: it holds the environment's
lock while it runs and leaves one record in its history when it ends, however it ends.

    with operation(ctx, "promote") as op:
        op.details["from_primary"] = "db1"
        with op.phase("fence"):
            ...

Operations nest within one process (e.g. a restore that runs create's steps): the inner one
neither takes nor releases the lock, and records its own line in the history.
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
from fabula.deploy import history, lock
from fabula.deploy.lock import Holder
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

    def record(self, exc: BaseException | None) -> dict:
        with self._phases_lock:
            phases = list(self.phases)
        return record_of(self.holder, *outcome_of(exc), ended=lock.now_iso(), details=self.details,
                         phases=phases, seconds=round(time.monotonic() - self._clock, 2))


def default_command() -> str:
    # argv[0] is a venv path or __main__.py; "fabula" is what the user would type again
    return shlex.join(["fabula", *sys.argv[1:]])


@contextmanager
def operation(ctx: Context, action: str, command: str | None = None) -> Iterator[Operation]:
    """Take the environment's lock (FabulaError naming the holder if taken), yield an Operation,
    append its record to the history when the block ends (outcome "ok", "failed" with the
    error's message, or "interrupted" on KeyboardInterrupt), and release the lock on every exit."""
    command = command or default_command()
    # the lock lives in the environment's directory, which the first `create` makes
    ctx.paths.env_dir.mkdir(parents=True, exist_ok=True)
    holder = Holder.of_this_process(action, command)
    nested = acquire_waiting_for_autoscaler(ctx, holder)
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
            if not nested:
                release(ctx, holder)


AUTOSCALER_ACTION = "autoscale"
AUTOSCALER_WAIT = 180  # the autoscaler holds the lock for one launch or retirement: seconds


def acquire_waiting_for_autoscaler(ctx: Context, holder: Holder) -> bool:
    """acquire(), but a lock held by the autoscaler's change is waited for rather than refused."""
    deadline = time.monotonic() + AUTOSCALER_WAIT
    said = False
    while True:
        try:
            return acquire(ctx, holder)
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


def locked_error(ctx: Context, holder: Holder) -> FabulaError:
    where = "" if holder.on_this_host() else \
        f" on another host ({holder.host}: fabula cannot tell from here whether it still runs)"
    return FabulaError(f"environment {ctx.env_name} is locked by {holder.describe()}{where}",
                       f"wait until that command ends; if it is no longer running: "
                       f"`fabula unlock {ctx.env_name}`")


def acquire(ctx: Context, holder: Holder) -> bool:
    """Take the lock for `holder`; True if this process already held it (a nested operation)."""
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
                raise locked_error(ctx, current)
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


def release(ctx: Context, holder: Holder) -> None:
    try:
        with lock.guarded(ctx.paths):
            removed = lock.remove_if(ctx.paths, holder.id)
    except FileNotFoundError:
        return  # the environment was destroyed meanwhile: nothing left to unlock
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
