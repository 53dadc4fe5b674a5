"""Which servers an environment has: their names and roles (the provider gives their addresses)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from fabula.state import EnvState, ServerRecord

if TYPE_CHECKING:
    from fabula.config import EnvironmentConfig

# the order servers are named and numbered in; databases first, web servers last
NAME_PREFIX = {"db-primary": "db", "db-replica": "db", "cache": "cache", "worker": "worker", "web": "web"}
def plan_servers(env: EnvironmentConfig, state: EnvState, native_web_group: bool = False) -> dict[str, ServerRecord]:
    """Keep the servers the state already has (same name and address), add what the counts ask
    for, and leave out the surplus (highest numbers first). A fixed inventory (`hosts:`) is the
    plan itself. With `native_web_group` the platform's group makes the web servers: none is
    planned, and the records of its members are kept as they are (the web tier follows the group)."""
    if env.fixed_inventory:
        return inventory_servers(env, state)
    wanted = env.servers.by_role()
    if state.web_desired is not None:  # the web group's desired count (`fabula scale`, the autoscaler)
        wanted["web"] = state.web_desired
    planned: dict[str, ServerRecord] = {}
    if native_web_group:
        wanted.pop("web", None)
        planned.update({s.name: s for s in state.by_role("web")})
    for role, count in wanted.items():
        existing = sorted(state.by_role(role), key=lambda s: _number(s.name))
        planned.update({s.name: s for s in existing[:count]})
    # the web group's warm pool is kept as it is: the autoscaler sizes it (autoscaling/warm_pool.py)
    planned.update({s.name: s for s in state.warm_pool()})
    used_names = set(planned)
    for role, count in wanted.items():
        have = sum(1 for s in planned.values() if s.role == role and not s.warm)
        for _ in range(count - have):
            name = _next_name(NAME_PREFIX[role], used_names)
            used_names.add(name)
            planned[name] = ServerRecord(name=name, role=role)  # its address is the provider's to give
    return planned


def inventory_servers(env: EnvironmentConfig, state: EnvState) -> dict[str, ServerRecord]:
    """The servers of `hosts:` (the load balancer's host is the provider's platform, not a server),
    at their addresses. A database host keeps the role the state gives it: after a promotion the
    former replica is the primary, whatever fabula.yml still says."""
    planned: dict[str, ServerRecord] = {}
    for name, host in env.hosts.items():
        if host.role == "lb":
            continue
        record = state.servers.get(name) or ServerRecord(name=name, role=host.role)
        databases = ("db-primary", "db-replica")
        if not (record.role in databases and host.role in databases):
            record.role = host.role
        record.address = host.address
        planned[name] = record
    return planned


def _number(name: str) -> int:
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits else 0


def _next_name(prefix: str, used: set[str]) -> str:
    n = 1
    while f"{prefix}{n}" in used:
        n += 1
    return f"{prefix}{n}"


def new_server(state: EnvState, role: str) -> ServerRecord:
    """A server record with a name never used before in the environment, e.g. a web server added
    by scaling or a deploy (its address is the provider's to give, also one never used before)."""
    prefix = NAME_PREFIX[role]
    number = max([state.last_number.get(prefix, 0)] + [_number(n) for n in state.servers if n.startswith(prefix)]) + 1
    state.last_number[prefix] = number
    return ServerRecord(name=f"{prefix}{number}", role=role)
