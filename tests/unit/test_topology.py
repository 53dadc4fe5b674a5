"""Server names and addresses are stable across runs and scale changes."""
from __future__ import annotations

from fabula.config import EnvironmentConfig
from fabula.state import EnvState
from fabula.topology import plan_servers


def env_with(**servers) -> EnvironmentConfig:
    return EnvironmentConfig.model_validate({"servers": servers})


def test_first_plan_names_roles_and_gives_addresses_from_the_subnet():
    state = EnvState(project="p", env="e", subnet="10.213.5.0/24")
    plan = plan_servers(env_with(web=2), state)
    assert {n: (s.role, s.address) for n, s in plan.items()} == {
        "db1": ("db-primary", "10.213.5.10"), "db2": ("db-replica", "10.213.5.11"),
        "cache1": ("cache", "10.213.5.12"), "worker1": ("worker", "10.213.5.13"),
        "web1": ("web", "10.213.5.14"), "web2": ("web", "10.213.5.15")}


def test_scaling_keeps_existing_servers_and_drops_the_highest_numbers():
    state = EnvState(project="p", env="e", subnet="10.213.5.0/24")
    state.servers = plan_servers(env_with(web=3), state)
    grown = plan_servers(env_with(web=4), state)
    assert {n: s.address for n, s in state.servers.items()}.items() <= {n: s.address for n, s in grown.items()}.items()
    assert grown["web4"].address not in {s.address for s in state.servers.values()}
    state.servers = grown
    shrunk = plan_servers(env_with(web=2), state)
    assert sorted(n for n, s in shrunk.items() if s.role == "web") == ["web1", "web2"]


# -- one addressing rule, shared with fabula.yml's check -------------------------------------------

import ipaddress  # noqa: E402

import pytest  # noqa: E402

from fabula.errors import ConfigError  # noqa: E402
from fabula.topology import FIRST_HOST, new_server, server_capacity  # noqa: E402


@pytest.mark.parametrize("prefix", [16, 20, 24, 26, 27, 28])
def test_a_subnet_that_passes_the_check_holds_the_servers_and_a_spare_web_server(prefix):
    subnet = ipaddress.ip_network(f"10.7.0.0/{prefix}")
    capacity = server_capacity(subnet)
    replicas = 0 if prefix == 28 else 1
    others = 3 + replicas  # db1, (db2,) cache1, worker1
    web = min(capacity - others - 1, 32)
    env = EnvironmentConfig.model_validate({"subnet": str(subnet), "servers": {"web": web, "db-replica": replicas}})
    state = EnvState(project="p", env="e", subnet=str(subnet))
    state.servers = plan_servers(env, state)
    spare = new_server(state, "web")  # a replacement or a serial deploy: one web server more than max
    addresses = [s.address for s in state.servers.values()] + [spare.address]
    assert len(set(addresses)) == len(addresses)
    assert all(subnet.network_address + FIRST_HOST <= ipaddress.ip_address(a) < subnet.broadcast_address
               for a in addresses)
    if capacity - others - 1 < 32:  # one more web server would not fit: refused at load
        with pytest.raises(ValueError, match="are needed"):
            EnvironmentConfig.model_validate({"subnet": str(subnet),
                                              "servers": {"web": web + 1, "db-replica": replicas}})


def test_a_slash_28_has_five_addresses_and_new_servers_wrap_round():
    state = EnvState(project="p", env="e", subnet="10.7.0.0/28")
    state.servers = plan_servers(env_with(web=1, **{"db-replica": 0}), state)
    assert sorted(s.address for s in state.servers.values()) == ["10.7.0.10", "10.7.0.11", "10.7.0.12", "10.7.0.13"]
    first = new_server(state, "web")
    assert first.address == "10.7.0.14"
    state.servers[first.name] = first
    del state.servers["web1"]
    assert new_server(state, "web").address == "10.7.0.13"  # the one left free, after wrapping round
    state.servers["web3"] = first
    with pytest.raises(Exception, match="no address left"):
        new_server(state, "web")


@pytest.mark.timeout(10)
def test_addresses_are_computed_not_listed_on_a_large_subnet():
    # a state file from before the /16 limit, with a /8: listing its hosts would fill the memory
    state = EnvState(project="p", env="e", subnet="10.0.0.0/8")
    state.servers = plan_servers(env_with(web=2), state)
    state.last_address = "10.255.255.254"  # the last one: the next wraps round
    assert new_server(state, "web").address == "10.0.0.16"


def provider_with(tmp_path, subnet: str | None):
    from fabula.providers.local import LocalProvider
    from fabula.state import EnvPaths

    env = EnvironmentConfig.model_validate({"subnet": subnet} if subnet else {})
    paths = EnvPaths(tmp_path / "state", "p", "e")
    return LocalProvider(paths, env, EnvState(project="p", env="e"))


def test_an_explicit_subnet_is_stored_and_create_can_plan_on_it(tmp_path, monkeypatch):
    from fabula.providers.local import network

    provider = provider_with(tmp_path, "10.77.0.0/24")
    # the environment's own bridge from a crashed create has the route already: not a clash
    monkeypatch.setattr(network, "routed_networks", lambda with_devices=False: [
        (ipaddress.ip_network("10.77.0.0/24"), provider.bridge), (ipaddress.ip_network("192.168.1.0/24"), "eth0")])
    assert provider.allocate_subnet() == "10.77.0.0/24"
    assert provider.state.subnet == "10.77.0.0/24"
    assert EnvState.load(provider.paths).subnet == "10.77.0.0/24"
    assert plan_servers(provider.env, provider.state)["db1"].address == "10.77.0.10"


def test_an_explicit_subnet_that_overlaps_a_route_of_the_machine_is_refused(tmp_path, monkeypatch):
    from fabula.providers.local import network

    provider = provider_with(tmp_path, "10.77.0.0/24")
    monkeypatch.setattr(network, "routed_networks", lambda with_devices=False: [
        (ipaddress.ip_network("10.0.0.0/8"), "eth0")])
    with pytest.raises(ConfigError) as refused:
        provider.allocate_subnet()
    assert "environments.e.subnet: 10.77.0.0/24 overlaps the route to 10.0.0.0/8 (dev eth0)" in str(refused.value)
    assert refused.value.hint and provider.state.subnet is None
