"""The environment's network on this machine: a bridge, and a namespace with a veth per server.

iproute2's `ip` is used rather than a netlink library so that every step is one an
operator can read, repeat and inspect by hand.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json

from fabula.errors import FabulaError
from fabula.providers.base import run_local


def ip(*args: str, netns: str | None = None, check: bool = True):
    argv = (["ip", "netns", "exec", netns] if netns else []) + ["ip", *args]
    result = run_local(argv, timeout=30)
    if check and not result.ok:
        raise FabulaError(f"`{' '.join(argv)}` failed: {result.stderr.strip()}")
    return result


def link_names() -> set[str]:
    return {link["ifname"] for link in json.loads(ip("-j", "link", "show").stdout or "[]")}


def netns_names() -> list[str]:
    result = ip("-j", "netns", "list", check=False)
    return [n["name"] for n in json.loads(result.stdout or "[]")]


def routed_networks(with_devices: bool = False) -> list:
    """The networks the machine has routes to; with_devices: (network, device) pairs."""
    routes = json.loads(ip("-j", "-4", "route", "show").stdout or "[]")
    nets = []
    for r in routes:
        dst = r.get("dst", "")
        if dst and dst != "default":
            net = ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False)
            nets.append((net, r.get("dev")) if with_devices else net)
    return nets


def veth_name(tag: str, server: str) -> str:
    return "fv" + hashlib.sha256(f"{tag}/{server}".encode()).hexdigest()[:10]


def ensure_bridge(name: str, gateway: str, prefix: int) -> None:
    if name not in link_names():
        ip("link", "add", name, "type", "bridge")
    addrs = json.loads(ip("-j", "-4", "addr", "show", "dev", name).stdout or "[]")
    have = {a["local"] for x in addrs for a in x.get("addr_info", [])}
    if gateway not in have:
        ip("addr", "add", f"{gateway}/{prefix}", "dev", name)
    ip("link", "set", name, "up")


def namespace_ready(netns: str, address: str) -> bool:
    if netns not in netns_names():
        return False
    result = ip("-j", "-4", "addr", "show", "dev", "eth0", netns=netns, check=False)
    if not result.ok:
        return False
    have = {a["local"] for x in json.loads(result.stdout or "[]") for a in x.get("addr_info", [])}
    return address in have


def ensure_namespace(netns: str, veth: str, bridge: str, address: str, prefix: int, gateway: str) -> None:
    if namespace_ready(netns, address):
        return
    remove_namespace(netns, veth)  # a half-made one from an interrupted run
    ip("netns", "add", netns)
    peer = "fp" + veth[2:]
    ip("link", "add", veth, "type", "veth", "peer", "name", peer, "netns", netns)
    ip("link", "set", veth, "master", bridge, "up")
    # the namespace's side in one `ip -n` process: `ip netns exec` makes a mount namespace for
    # each command (five more processes a server)
    inside = [["link", "set", "lo", "up"], ["link", "set", peer, "name", "eth0"],
              ["addr", "add", f"{address}/{prefix}", "dev", "eth0"], ["link", "set", "eth0", "up"],
              ["route", "add", "default", "via", gateway]]
    argv = ["ip", "-n", netns, "-batch", "-"]
    result = run_local(argv, input="".join(" ".join(c) + "\n" for c in inside), timeout=30)
    if not result.ok:
        raise FabulaError(f"`{' '.join(argv)}` failed: {result.stderr.strip()}")
    # the machine may remember this address at a former server's MAC: forget it
    ip("neigh", "flush", "to", address, "dev", bridge, check=False)


def remove_namespace(netns: str, veth: str) -> None:
    if netns in netns_names():
        ip("netns", "del", netns)
    if veth in link_names():
        ip("link", "del", veth, check=False)


def remove_bridge(name: str) -> None:
    if name in link_names():
        ip("link", "del", name)
