"""The one rule for servers' addresses in a subnet: which addresses servers get, and how many a
subnet holds (fabula.config checks fabula.yml with it; topology.py hands them out)."""
from __future__ import annotations

import ipaddress
from collections.abc import Iterator

FIRST_HOST = 10  # .1 is the host's end of the bridge; .2-.9 are kept free
# the one rule for how many servers a subnet holds (fabula.config checks fabula.yml with it): every
# address from network + FIRST_HOST up to, not including, the broadcast address
SMALLEST_PREFIX, LARGEST_PREFIX = 28, 16  # a /28 holds 5 servers; a /16 is as large as a subnet may be


def server_capacity(network: ipaddress.IPv4Network) -> int:
    """How many servers `network` has addresses for."""
    return max(network.num_addresses - FIRST_HOST - 1, 0)


def server_addresses(network: ipaddress.IPv4Network, start: int = 0) -> Iterator[str]:
    """The servers' addresses of `network` in order, from the `start`-th one, then wrapping round
    to the first; computed, never listed (a large network must not fill the memory)."""
    first, count = int(network.network_address) + FIRST_HOST, server_capacity(network)
    for i in range(count):
        yield str(ipaddress.IPv4Address(first + (start + i) % count))


def address_index(network: ipaddress.IPv4Network, address: str) -> int | None:
    """The position of `address` among the servers' addresses of `network`, or None."""
    try:
        index = int(ipaddress.IPv4Address(address)) - int(network.network_address) - FIRST_HOST
    except ValueError:
        return None
    return index if 0 <= index < server_capacity(network) else None
