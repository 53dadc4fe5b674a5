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
import subprocess
import tempfile
from pathlib import Path

from fabula.context import Context
from fabula.environment import lock
from fabula.environment.audit import operation
from fabula.providers.base import SYSTEM_PATH


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
    """Take everything in the environment's directory but its lock file away at once: moved into
    the state root's trash (a rename), and removed from there by a process of its own, since
    deleting a database's and the releases' tens of thousands of files takes seconds the user
    need not wait. A removal cut short (the machine stopped) is finished by the next destroy."""
    folder, trash = ctx.paths.env_dir, ctx.paths.trash_dir
    trash.mkdir(mode=0o700, exist_ok=True)
    bin_ = Path(tempfile.mkdtemp(prefix=f"{ctx.paths.project}.{ctx.paths.env}.", dir=trash))
    for entry in os.scandir(folder):
        if entry.name == lock.LOCK_FILE:
            continue
        try:
            os.rename(entry.path, bin_ / entry.name)
        except OSError:   # another file system under the directory (a mount): removed here
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
    # every bin in the trash, this one and any a removal cut short left
    subprocess.Popen(["rm", "-rf", "--one-file-system", "--", *sorted(str(p) for p in trash.iterdir())],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, env={"PATH": SYSTEM_PATH})
