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
    """The security group of one server: its role's, or nothing while it awaits a rebuild."""
    if record.rebuild:
        return []
    return ROLES[record.role].ingress(ctx)
