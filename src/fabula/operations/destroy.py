"""`fabula destroy`: remove every process, namespace, link, firewall table and directory the
environment made, also after a crash in the middle of `create`.

Like every command that changes the environment it holds the lock (a crashed `create`'s lock is
stale and taken over; a live command's is broken only with --force) and leaves a history record.
The record is written beside the environment's directory (history.py), so it outlives it; the
directory is emptied but for the lock, and goes when the lock is released (audit.release).
"""
from __future__ import annotations

import os
import shutil

from fabula.context import Context
from fabula.environment import lock
from fabula.environment.audit import operation


def destroy(ctx: Context, force: bool = False) -> list[str]:
    ctx.provider.check_prerequisites()
    existed = ctx.paths.env_dir.exists()
    with operation(ctx, "destroy", force=force) as op:
        removed = ctx.provider.destroy()
        for item in removed:
            ctx.out.step("destroy", f"removed {item}")
        with op.phase("directory"):
            empty_but_the_lock(ctx)
        op.removes_environment = True  # the directory goes with the lock, once this is recorded
        op.details["removed"] = len(removed)
        if existed:
            removed.append(f"directory {ctx.paths.env_dir}")
            ctx.out.step("destroy", f"removed {ctx.paths.env_dir} (state, secrets, data, releases)")
    return removed


def empty_but_the_lock(ctx: Context) -> None:
    """Remove everything in the environment's directory but its lock file."""
    folder = ctx.paths.env_dir
    for entry in os.scandir(folder):
        if entry.name == lock.LOCK_FILE:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
