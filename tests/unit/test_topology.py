"""Server names and addresses are stable across runs and scale changes."""
from __future__ import annotations

from fabula.config import EnvironmentConfig
from fabula.state import EnvState
from fabula.topology import plan_servers


def env_with(**servers) -> EnvironmentConfig:
    return EnvironmentConfig.model_validate({"servers": servers})


def test_first_plan_names_and_roles_the_servers_databases_first():
    state = EnvState(project="p", env="e", subnet="10.213.5.0/24")
    plan = plan_servers(env_with(web=2), state)
    assert [(n, s.role) for n, s in plan.items()] == [
        ("db1", "db-primary"), ("db2", "db-replica"), ("cache1", "cache"), ("worker1", "worker"),
        ("web1", "web"), ("web2", "web")]


def test_scaling_keeps_existing_servers_and_drops_the_highest_numbers():
    state = EnvState(project="p", env="e", subnet="10.213.5.0/24")
    state.servers = plan_servers(env_with(web=3), state)
    grown = plan_servers(env_with(web=4), state)
    assert set(state.servers) < set(grown) and all(grown[n] is s for n, s in state.servers.items())
    state.servers = grown
    shrunk = plan_servers(env_with(web=2), state)
    assert sorted(n for n, s in shrunk.items() if s.role == "web") == ["web1", "web2"]


# -- addresses: the local provider's, by one rule shared with fabula.yml's check ----------------------

import ipaddress  # noqa: E402

import pytest  # noqa: E402

from fabula.addressing import FIRST_HOST, server_capacity  # noqa: E402
from fabula.errors import ConfigError  # noqa: E402
from fabula.topology import new_server  # noqa: E402


def provider_with(tmp_path, subnet: str | None, env: EnvironmentConfig | None = None, allocated: bool = True):
    from fabula.providers.local import LocalProvider
    from fabula.state import EnvPaths

    env = env or EnvironmentConfig.model_validate({"subnet": subnet} if subnet else {})
    paths = EnvPaths(tmp_path / "state", "p", "e")
    return LocalProvider(paths, env, EnvState(project="p", env="e", subnet=subnet if allocated else None))


def addressed(provider, records) -> dict[str, str]:
    """Add the records to the provider's inventory and give each its address, in order."""
    for record in records:
        provider.state.servers[record.name] = record
        provider.assign_address(record.name)
    return {n: s.address for n, s in provider.state.servers.items()}


def test_addresses_are_given_in_order_from_the_subnet(tmp_path):
    provider = provider_with(tmp_path, "10.213.5.0/24")
    assert addressed(provider, plan_servers(env_with(web=2), provider.state).values()) == {
        "db1": "10.213.5.10", "db2": "10.213.5.11", "cache1": "10.213.5.12", "worker1": "10.213.5.13",
        "web1": "10.213.5.14", "web2": "10.213.5.15"}
    assert EnvState.load(provider.paths).servers["web2"].address == "10.213.5.15"  # recorded at once


@pytest.mark.parametrize("prefix", [16, 20, 24, 26, 27, 28])
def test_a_subnet_that_passes_the_check_holds_the_servers_and_a_spare_web_server(tmp_path, prefix):
    subnet = ipaddress.ip_network(f"10.7.0.0/{prefix}")
    capacity = server_capacity(subnet)
    replicas = 0 if prefix == 28 else 1
    others = 3 + replicas  # db1, (db2,) cache1, worker1
    web = min(capacity - others - 1, 32)
    env = EnvironmentConfig.model_validate({"subnet": str(subnet), "servers": {"web": web, "db-replica": replicas}})
    provider = provider_with(tmp_path, str(subnet), env)
    addressed(provider, plan_servers(env, provider.state).values())
    # a replacement or a serial deploy: one web server more than max
    addresses = list(addressed(provider, [new_server(provider.state, "web")]).values())
    assert len(set(addresses)) == len(addresses)
    assert all(subnet.network_address + FIRST_HOST <= ipaddress.ip_address(a) < subnet.broadcast_address
               for a in addresses)
    if capacity - others - 1 < 32:  # one more web server would not fit: refused at load
        with pytest.raises(ValueError, match="are needed"):
            EnvironmentConfig.model_validate({"subnet": str(subnet),
                                              "servers": {"web": web + 1, "db-replica": replicas}})


def test_a_slash_28_has_five_addresses_and_new_servers_wrap_round(tmp_path):
    provider = provider_with(tmp_path, "10.7.0.0/28", env_with(web=1, **{"db-replica": 0}))
    state = provider.state
    addressed(provider, plan_servers(env_with(web=1, **{"db-replica": 0}), state).values())
    assert sorted(s.address for s in state.servers.values()) == ["10.7.0.10", "10.7.0.11", "10.7.0.12", "10.7.0.13"]
    first = new_server(state, "web")
    assert addressed(provider, [first])[first.name] == "10.7.0.14"
    del state.servers["web1"]
    second = new_server(state, "web")
    assert addressed(provider, [second])[second.name] == "10.7.0.13"  # the one left free, after wrapping round
    with pytest.raises(Exception, match="no address left"):
        addressed(provider, [new_server(state, "web")])


@pytest.mark.timeout(10)
def test_addresses_are_computed_not_listed_on_a_large_subnet(tmp_path):
    # a state file from before the /16 limit, with a /8: listing its hosts would fill the memory
    provider = provider_with(tmp_path, "10.0.0.0/8", env_with(web=2))
    addressed(provider, plan_servers(env_with(web=2), provider.state).values())
    provider.state.last_address = "10.255.255.254"  # the last one: the next wraps round
    assert addressed(provider, [new_server(provider.state, "web")])["web3"] == "10.0.0.16"


def test_an_explicit_subnet_is_stored_and_create_can_plan_on_it(tmp_path, monkeypatch):
    from fabula.providers.local import network

    provider = provider_with(tmp_path, "10.77.0.0/24", allocated=False)
    # the environment's own bridge from a crashed create has the route already: not a clash
    monkeypatch.setattr(network, "routed_networks", lambda with_devices=False: [
        (ipaddress.ip_network("10.77.0.0/24"), provider.bridge), (ipaddress.ip_network("192.168.1.0/24"), "eth0")])
    assert provider.allocate_subnet() == "10.77.0.0/24"
    assert provider.state.subnet == "10.77.0.0/24"
    assert EnvState.load(provider.paths).subnet == "10.77.0.0/24"
    assert addressed(provider, plan_servers(provider.env, provider.state).values())["db1"] == "10.77.0.10"


def test_an_explicit_subnet_that_overlaps_a_route_of_the_machine_is_refused(tmp_path, monkeypatch):
    from fabula.providers.local import network

    provider = provider_with(tmp_path, "10.77.0.0/24", allocated=False)
    monkeypatch.setattr(network, "routed_networks", lambda with_devices=False: [
        (ipaddress.ip_network("10.0.0.0/8"), "eth0")])
    with pytest.raises(ConfigError) as refused:
        provider.allocate_subnet()
    assert "environments.e.local.subnet: 10.77.0.0/24 overlaps the route to 10.0.0.0/8 (dev eth0)" in str(refused.value)
    assert refused.value.hint and provider.state.subnet is None
