"""Which servers an environment has: names, roles and stable addresses from its subnet."""
from __future__ import annotations

import ipaddress

from fabula.config import EnvironmentConfig
from fabula.errors import FabulaError
from fabula.state import EnvState, ServerRecord

# the order servers are named and numbered in; databases first, web servers last
NAME_PREFIX = {"db-primary": "db", "db-replica": "db", "cache": "cache", "worker": "worker", "web": "web"}
FIRST_HOST = 10  # .1 is the host's end of the bridge; .2-.9 are kept free


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
    free = (str(a) for a in list(ipaddress.ip_network(state.subnet).hosts())[FIRST_HOST - 1:]
            if str(a) not in used_addresses)
    for role, count in wanted.items():
        have = sum(1 for s in planned.values() if s.role == role)
        for _ in range(count - have):
            name = _next_name(NAME_PREFIX[role], used_names)
            used_names.add(name)
            planned[name] = ServerRecord(name=name, role=role, address=next(free))
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
    hosts = [str(a) for a in list(ipaddress.ip_network(state.subnet).hosts())[FIRST_HOST - 1:]]
    used = {s.address for s in state.servers.values()} | ({state.last_address} if state.last_address else set())
    highest = max((hosts.index(a) for a in used if a in hosts), default=-1)
    free = [a for a in hosts[highest + 1:] + hosts[:highest + 1] if a not in used]
    if not free:
        raise FabulaError(f"no address left in {state.subnet} for another {role} server",
                          "use a larger `subnet` for this environment")
    state.last_address = free[0]
    return ServerRecord(name=f"{prefix}{number}", role=role, address=free[0])
