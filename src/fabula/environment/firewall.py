"""Every server's security group, applied from the inventory: called whenever the set of servers
or their roles change (create, a new or removed web server, a failover)."""
from __future__ import annotations

from fabula.context import Context
from fabula.roles import firewall_rules


def apply_firewalls(ctx: Context) -> None:
    for record in ctx.state.servers.values():
        ctx.provider.apply_firewall(ctx.host(record.name), firewall_rules(ctx, record))
