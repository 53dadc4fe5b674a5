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
