"""Which servers an environment has: names, roles and stable addresses from its subnet."""
from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from fabula.addressing import FIRST_HOST, address_index, server_addresses, server_capacity  # noqa: F401
from fabula.errors import FabulaError
from fabula.state import EnvState, ServerRecord

if TYPE_CHECKING:
    from fabula.config import EnvironmentConfig

# the order servers are named and numbered in; databases first, web servers last
NAME_PREFIX = {"db-primary": "db", "db-replica": "db", "cache": "cache", "worker": "worker", "web": "web"}
def plan_servers(env: EnvironmentConfig, state: EnvState) -> dict[str, ServerRecord]:
    """Keep the servers the state already has (same name and address), add what the counts ask
    for, and leave out the surplus (highest numbers first)."""
    wanted = env.servers.by_role()
    if state.web_desired is not None:  # the web group's desired count (`fabula scale`, the autoscaler)
        wanted["web"] = state.web_desired
    planned: dict[str, ServerRecord] = {}
    for role, count in wanted.items():
        existing = sorted(state.by_role(role), key=lambda s: _number(s.name))
        planned.update({s.name: s for s in existing[:count]})
    used_names = set(planned)
    used_addresses = {s.address for s in planned.values()}
    free = (a for a in server_addresses(ipaddress.ip_network(state.subnet)) if a not in used_addresses)
    for role, count in wanted.items():
        have = sum(1 for s in planned.values() if s.role == role)
        for _ in range(count - have):
            name = _next_name(NAME_PREFIX[role], used_names)
            used_names.add(name)
            address = next(free, None)
            if address is None:
                raise FabulaError(f"no address left in {state.subnet} for another {role} server",
                                  "use a larger `subnet` for this environment")
            planned[name] = ServerRecord(name=name, role=role, address=address)
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
    """A server record with a name and an address never used before in the environment (while
    the subnet has them), e.g. a web server added by scaling or a deploy."""
    prefix = NAME_PREFIX[role]
    number = max([state.last_number.get(prefix, 0)] + [_number(n) for n in state.servers if n.startswith(prefix)]) + 1
    state.last_number[prefix] = number
    network = ipaddress.ip_network(state.subnet)
    used = {s.address for s in state.servers.values()} | ({state.last_address} if state.last_address else set())
    indexes = [i for i in (address_index(network, a) for a in used) if i is not None]
    # the address after the highest one used, wrapping round: one never used before while there is one
    highest = max(indexes, default=-1)
    address = next((a for a in server_addresses(network, highest + 1) if a not in used), None)
    if address is None:
        raise FabulaError(f"no address left in {state.subnet} for another {role} server",
                          "use a larger `subnet` for this environment")
    state.last_address = address
    return ServerRecord(name=f"{prefix}{number}", role=role, address=address)
