"""`fabula destroy`: remove every process, namespace, link, firewall table and directory the
environment made, also after a crash in the middle of `create`."""
from __future__ import annotations

import shutil

from fabula.context import Context


def destroy(ctx: Context) -> list[str]:
    ctx.provider.check_prerequisites()
    removed = ctx.provider.destroy()
    for item in removed:
        ctx.out.step("destroy", f"removed {item}")
    if ctx.paths.env_dir.exists():
        shutil.rmtree(ctx.paths.env_dir)
        removed.append(f"directory {ctx.paths.env_dir}")
        ctx.out.step("destroy", f"removed {ctx.paths.env_dir} (state, secrets, data, releases)")
    return removed
