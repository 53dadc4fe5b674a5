"""An environment shared by a team (a provider with a SharedStore: ssh): its lock, state, history,
secrets and certificate authority are the store's; this machine's state directory is a copy,
refreshed when a command opens the environment and again once it holds the lock, and sent back
when a changing command ends."""
from __future__ import annotations

import time
from pathlib import Path

from fabula.context import Context
from fabula.environment import history, lock
from fabula.environment.lock import Holder
from fabula.errors import FabulaError
from fabula.providers.base import SharedStore
from fabula.state import EnvPaths


def shared_files(paths: EnvPaths) -> dict[str, Path]:
    """What the store keeps, by name: this machine's paths of it."""
    return {"state.json": paths.state_file, "history.jsonl": paths.history_file, "secrets": paths.secrets_dir,
            "pki": paths.pki_dir}


def refresh(ctx: Context) -> None:
    """This machine's copy made the store's (when the provider has one); not while a command cut
    off here left its lock behind: the files it left are newer than the store's, and the next
    changing command sends them (take())."""
    store = ctx.provider.shared_store()
    if store is None:
        return
    try:
        left = lock.read(ctx.paths)
    except lock.Unreadable:
        left = None
    if left is not None and left.is_stale():
        return
    ctx.paths.make_env_dir()
    store.pull(shared_files(ctx.paths))
    ctx.state.reload(ctx.paths)


def take(ctx: Context, store: SharedStore, holder: Holder, as_dict: dict, *, autoscaler: str = "",
         wait: float = 0) -> None:
    """The store's lock for `holder`, then its files: an error naming whoever holds the lock.
    A lock held for action `autoscaler` (fabula's program on the platform host, changing one
    server) is waited for, up to `wait` seconds, unless `holder` is that program itself."""
    deadline, said = time.monotonic() + wait, False
    while True:
        current = store.acquire(as_dict)
        if current is None or holder.action == autoscaler or current.get("action") != autoscaler \
                or time.monotonic() > deadline:
            break
        if not said:
            ctx.out.step(holder.action, "waiting for the change of fabula's program on the hosts to finish")
            said = True
        time.sleep(1)
    if current is not None:
        who = Holder.from_json(current)
        raise FabulaError(f"environment {ctx.env_name} is locked by {who.describe()} (the team's lock, held on "
                          "the environment's hosts)",
                          "wait until that command ends (the lock goes with it, also if that machine "
                          "is cut off: within a minute)")
    try:
        cut_off = store.interrupted()
        ran_here = cut_off is not None and history.has_record(ctx.paths, cut_off.get("id", ""))
        if ran_here and cut_off is not None and ctx.paths.state_file.exists():
            # the cut-off command ran from this state directory (taking over its stale local lock
            # recorded it in this history): the files it left here are the newer ones
            ctx.out.warn(f"the last command on {ctx.env_name}, `{cut_off.get('command')}` (pid {cut_off.get('pid')}), "
                         "was cut off before it sent its state back: this machine's copy, which it left, is kept "
                         "and sent")
            store.push(shared_files(ctx.paths))
        else:
            if cut_off is not None:
                ctx.out.warn(f"the last command on {ctx.env_name}, `{cut_off.get('command')}` by "
                             f"{cut_off.get('owner')}, was cut off before it sent its state back: what it changed "
                             f"since it began may be missing here; `fabula create {ctx.env_name}` converges the "
                             "hosts again")
            store.pull(shared_files(ctx.paths))
    except BaseException:
        store.release()
        raise


def give_back(ctx: Context, store: SharedStore, removed: bool) -> None:
    """The files back to the store (unless the environment was destroyed), and its lock released."""
    try:
        if not removed:
            store.push(shared_files(ctx.paths))
    finally:
        store.release()
