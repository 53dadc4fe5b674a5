"""The ssh provider's pieces that need no host: the inventory as the plan, the facts a host
reports, a team's lock as the operation sees it, and a fixed inventory's refusal to scale."""
from __future__ import annotations

import io
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from fabula.autoscaling.policy import check_desired
from fabula.config import load_config
from fabula.context import Context
from fabula.environment import history, lock, sharing
from fabula.environment.audit import operation
from fabula.environment.lock import Holder
from fabula.errors import ConfigError, FabulaError
from fabula.output import Output
from fabula.providers.base import SharedStore
from fabula.providers.ssh import SshProvider
from fabula.providers.ssh.scripts import HostFacts
from fabula.providers.ssh.shared import _record
from fabula.state import EnvPaths, EnvState, ServerRecord
from fabula.topology import plan_servers
from tests.unit.test_config import write
from tests.unit.test_config_ssh import SSH


def environment(tmp_path: Path):
    return load_config(write(tmp_path, SSH)).environment("production")


def test_the_inventory_is_the_plan_without_the_load_balancers_host(tmp_path: Path):
    planned = plan_servers(environment(tmp_path), EnvState(project="shop", env="production"))
    assert sorted(planned) == ["cache1", "db1", "db2", "web1", "web2", "worker1"]
    assert planned["web1"].address == "10.0.0.11" and planned["db2"].role == "db-replica"


def test_a_promoted_replica_keeps_its_role_whatever_the_file_says(tmp_path: Path):
    state = EnvState(project="shop", env="production")
    state.servers = {"db1": ServerRecord("db1", "db-replica", "10.0.0.41", rebuild=True),
                     "db2": ServerRecord("db2", "db-primary", "10.0.0.42")}
    planned = plan_servers(environment(tmp_path), state)
    assert (planned["db1"].role, planned["db2"].role) == ("db-replica", "db-primary")
    assert planned["db1"].rebuild   # what the state knew of it is kept


def test_host_facts_are_read_from_one_line():
    facts = HostFacts.parse("debian 12 amd64 3.11 yes\n")
    assert (facts.distribution, facts.version, facts.architecture, facts.python, facts.systemd) == (
        "debian", "12", "amd64", "3.11", True)
    assert HostFacts.parse("").distribution == "unknown"   # a host that printed nothing


def test_the_holder_record_is_found_among_a_noisy_shells_lines():
    assert _record('welcome!\n{"owner": "alice@laptop", "pid": 7}\n') == {"owner": "alice@laptop", "pid": 7}
    assert _record("") is None
    with pytest.raises(FabulaError):
        _record("garbage that is no record")


class BusyStore(SharedStore):
    """A team's store whose lock another operator holds."""

    def __init__(self):
        self.pulled = self.pushed = self.released = 0

    def acquire(self, holder: dict) -> dict | None:
        return {"id": "x", "owner": "bob@desk", "host": "desk", "pid": 42, "pid_start": None, "boot_id": "",
                "started": "2026-11-30T10:00:00+00:00", "action": "deploy", "command": "fabula deploy prod"}

    def release(self) -> None:
        self.released += 1

    def holder(self) -> dict | None:
        return None

    def pull(self, files) -> None:
        self.pulled += 1

    def push(self, files) -> None:
        self.pushed += 1


class FreeStore(BusyStore):
    def acquire(self, holder: dict) -> dict | None:
        return None


def context(tmp_path: Path, store: SharedStore) -> Context:
    paths = EnvPaths(tmp_path / "state", "shop", "production")
    out = Output(quiet=True, err_console=Console(file=io.StringIO(), width=400))
    return Context(config=load_config(write(tmp_path, SSH)), env_name="production", env=None, paths=paths,
                   state=EnvState(project="shop", env="production"), out=out,
                   provider=SimpleNamespace(shared_store=lambda: store))


def test_another_operators_lock_refuses_the_command_naming_them_and_releases_ours(tmp_path: Path):
    ctx = context(tmp_path, BusyStore())
    with pytest.raises(FabulaError) as refused, operation(ctx, "maintenance"):
        pass
    assert "bob@desk" in str(refused.value) and "fabula deploy prod" in str(refused.value)
    # this machine's own lock was let go: a command here is not blocked by the refused one
    free = FreeStore()
    ctx.provider = SimpleNamespace(shared_store=lambda: free)
    with operation(ctx, "maintenance"):
        pass
    assert (free.pulled, free.pushed, free.released) == (1, 1, 1)
    assert [r["action"] for r in history.read(ctx.paths)[0]] == ["maintenance"]


def test_a_fixed_inventory_cannot_scale(tmp_path: Path):
    ctx = context(tmp_path, FreeStore())
    ctx.env = ctx.config.environment("production")
    with pytest.raises(ConfigError) as refused:
        check_desired(ctx, 3)
    assert "fixed inventory" in refused.value.message and "hosts" in (refused.value.hint or "")


class CutOffStore(FreeStore):
    """A free lock whose last holder was cut off (its record left behind)."""

    def __init__(self, host: str):
        super().__init__()
        self.left = {"id": "cutoff000001", "owner": "alice@laptop", "host": host, "pid": 9,
                     "command": "fabula db promote prod"}

    def interrupted(self) -> dict | None:
        return self.left


def test_a_command_cut_off_here_leaves_its_state_to_be_sent_not_overwritten(tmp_path: Path):
    store = CutOffStore("this-machine")
    ctx = context(tmp_path, store)
    ctx.paths.make_env_dir()
    ctx.paths.state_file.write_text('{"project": "shop", "env": "production"}')
    # its stale lock here was taken over, which recorded it in this state directory's history
    history.append(ctx.paths, {"id": store.left["id"], "action": "db promote", "outcome": "interrupted"})
    with operation(ctx, "maintenance"):
        pass
    assert (store.pulled, store.pushed) == (0, 2)   # sent on taking the lock, and at the end
    assert "cut off" in ctx.out.err.file.getvalue()


def test_a_command_cut_off_elsewhere_is_named_and_the_store_is_pulled(tmp_path: Path):
    # (another machine, or another state directory of this one: its history has no such record)
    store = CutOffStore("another-machine")
    ctx = context(tmp_path, store)
    with operation(ctx, "maintenance"):
        pass
    assert (store.pulled, store.pushed) == (1, 1)
    assert "alice@laptop" in ctx.out.err.file.getvalue()


def test_opening_keeps_the_files_a_command_cut_off_here_left(tmp_path: Path):
    store = FreeStore()
    ctx = context(tmp_path, store)
    ctx.paths.make_env_dir()
    dead = Holder.from_json({"id": "dead00000001", "owner": "root@here", "host": socket.gethostname(),
                             "pid": 2 ** 22 + 7, "pid_start": "1", "boot_id": lock.boot_id(), "started": "",
                             "action": "db promote", "command": "fabula db promote prod"})
    assert lock.create_exclusively(ctx.paths, dead) and dead.is_stale()
    sharing.refresh(ctx)
    assert store.pulled == 0   # kept for the next changing command to send
    lock.lock_path(ctx.paths).unlink()
    sharing.refresh(ctx)
    assert store.pulled == 1


def provider_with(tmp_path: Path, here: str, hosts: dict[str, str], build: str = "auto"):
    """An ssh provider of SSH's environment (`ssh.build` set), this machine's facts and the hosts'
    given (names to a facts line); preparing a host only records it."""
    config = load_config(write(tmp_path, SSH.replace("ssh: {user: deploy,", f"ssh: {{build: {build}, user: deploy,")))
    env = config.environment("production")
    provider = SshProvider(EnvPaths(tmp_path / "state", "shop", "production"), env,
                           EnvState(project="shop", env="production"))
    prepared: list[tuple[str, tuple[str, ...]]] = []
    provider.this_machine = lambda: HostFacts.parse(here)   # type: ignore[method-assign]
    provider.facts = lambda host: HostFacts.parse(hosts.get(host.name, "debian 12 amd64 3.11 yes"))  # type: ignore[method-assign]
    provider.preparation.make_tree = lambda host: None  # type: ignore[method-assign]
    provider.preparation.install = lambda host, packages: prepared.append((host.name, packages))  # type: ignore[method-assign]
    return provider, prepared


def test_releases_are_built_here_when_the_app_hosts_match_this_machine(tmp_path: Path):
    provider, prepared = provider_with(tmp_path, "debian 12 amd64 3.11 yes", {})
    place = provider.build_place()
    assert place.host is None and place.why.startswith("this machine") and prepared == []


def test_releases_are_built_on_the_worker_host_when_this_machine_differs(tmp_path: Path):
    provider, prepared = provider_with(tmp_path, "ubuntu 24.04 arm64 3.12 yes", {})
    place = provider.build_place()
    assert place.host is not None and place.host.name == "worker1"
    assert "this machine runs ubuntu 24.04, arm64, Python 3.12" in place.why
    assert prepared == [("worker1", ("python3-venv", "ca-certificates"))]
    # asked for, even when this machine would do
    provider, _ = provider_with(tmp_path, "debian 12 amd64 3.11 yes", {}, build="worker")
    assert provider.build_place().host.name == "worker1"


def test_a_build_here_that_would_not_run_on_the_hosts_is_refused_naming_the_fix(tmp_path: Path):
    provider, prepared = provider_with(tmp_path, "ubuntu 24.04 arm64 3.12 yes", {}, build="here")
    with pytest.raises(FabulaError) as refused:
        provider.build_place()
    assert "web1 runs debian 12, amd64, Python 3.11" in refused.value.message
    assert "ssh.build: auto" in (refused.value.hint or "") and prepared == []


def test_app_hosts_of_different_systems_are_named(tmp_path: Path):
    provider, prepared = provider_with(tmp_path, "ubuntu 24.04 arm64 3.12 yes", {"web2": "debian 12 arm64 3.11 yes"})
    with pytest.raises(FabulaError) as refused:
        provider.build_place()
    assert "unlike web2" in refused.value.message and prepared == []
