"""`fabula maintenance ENV on|off`: the maintenance page on every web server, as an operation."""
from __future__ import annotations

from fabula.context import Context
from fabula.environment.audit import operation
from fabula.errors import FabulaError
from fabula.maintenance import set_maintenance


def switch(ctx: Context, on: bool) -> None:
    """An operation of its own (the lock, a history record). Within other operations (restore, a
    full deploy) set_maintenance is called directly."""
    if not ctx.paths.state_file.exists():
        raise FabulaError(f"environment {ctx.env_name} does not exist", f"`fabula create {ctx.env_name}` creates it")
    with operation(ctx, f"maintenance {'on' if on else 'off'}"):
        set_maintenance(ctx, on)
