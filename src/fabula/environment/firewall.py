"""Every server's security group, applied from the inventory: called whenever the set of servers
or their roles change (create, a new or removed web server, a failover)."""
from __future__ import annotations

from fabula.context import Context
from fabula.errors import FabulaError
from fabula.roles import firewall_rules


def apply_firewalls(ctx: Context) -> None:
    for record in ctx.state.servers.values():
        try:
            ctx.provider.apply_firewall(ctx.host(record.name), firewall_rules(ctx, record))
        except FabulaError as exc:
            if not record.rebuild:
                raise
            # a fenced former primary whose host does not answer: its rules are made again when
            # `reset-replicas` rebuilds it; the others' rules must not wait for it
            ctx.out.warn(f"{record.name}: firewall not updated ({exc.message})")
