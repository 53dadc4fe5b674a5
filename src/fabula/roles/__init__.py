"""The five roles of the architecture, one module each; `ROLES` maps a role's name in
fabula.yml to its implementation."""
from fabula.roles.base import Role
from fabula.roles.cache import Cache
from fabula.roles.db_primary import DatabasePrimary
from fabula.roles.db_replica import DatabaseReplica
from fabula.roles.web import Web
from fabula.roles.worker import Worker

ROLES: dict[str, Role] = {r.name: r for r in (Web(), Worker(), Cache(), DatabasePrimary(), DatabaseReplica())}

__all__ = ["ROLES", "Role"]


def firewall_rules(ctx, record) -> list:
    """The security group of one server: its role's; while it awaits a rebuild, it admits no one
    but may still reach what its role reaches (a replica's base backup from the primary)."""
    role = ROLES[record.role]
    if record.rebuild:
        return role.egress(ctx)
    return role.ingress(ctx) + role.egress(ctx)
