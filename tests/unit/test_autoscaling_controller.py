"""The autoscaler's rounds against a fake load balancer: what it changes and in which order, that
it changes nothing while another command holds the lock or a process is suspended, that each
change is an operation, and that it backs off after a failure."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from fabula.autoscaling import controller as controller_module
from fabula.autoscaling.controller import Controller
from fabula.config import EnvironmentConfig
from fabula.environment import history, lock
from fabula.output import Output
from fabula.state import EnvPaths, EnvState, ServerRecord


class FakeLB:
    """Per-server HAProxy rows: a status, and a request counter growing at `rate` per second."""

    def __init__(self, clock, servers: list[str], rate: float = 0):
        self.clock, self.rate = clock, rate
        self.status = {name: "UP" for name in servers}
        self.count = 0.0
        self.at = clock()

    def stats(self):
        now = self.clock()
        self.count += self.rate * (now - self.at)
        self.at = now
        per = int(self.count / max(len(self.status), 1))
        return {n: {"status": s, "stot": str(per), "scur": "0", "qcur": "0"} for n, s in self.status.items()}

    def health(self):
        return dict(self.status)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def world(tmp_path, monkeypatch):
    clock = Clock()
    paths = EnvPaths(tmp_path, "p", "e")
    paths.env_dir.mkdir(parents=True)
    env = EnvironmentConfig.model_validate({"servers": {"web": 2}, "autoscaling": {
        "min": 1, "desired": 2, "max": 4, "metric": "requests", "target": 5, "scale_out_cooldown": 10,
        "scale_in_cooldown": 20, "health_grace": 3, "interval": 1, "window": 4}})
    state = EnvState(project="p", env="e", subnet="10.9.0.0/24", release="r1", web_desired=2, servers={
        "web1": ServerRecord("web1", "web", "10.9.0.10", "r1"), "web2": ServerRecord("web2", "web", "10.9.0.11", "r1")})
    state.save(paths)
    lb = FakeLB(clock, ["web1", "web2"])
    calls: list[tuple] = []

    def open_environment(config_path, env_name, out, **options):
        fresh = EnvState.load(paths)
        return SimpleNamespace(env=env, env_name="e", project="p", paths=paths, state=fresh, out=out, hosts={},
                               provider=SimpleNamespace(load_balancer=lb, shared_store=lambda: None,
                                                        web_group=lambda ctx: None),
                               config=SimpleNamespace(path=config_path))

    def set_desired(ctx, op, desired, health=None):
        """Like the real one: the state and the load balancer get exactly `desired` web servers."""
        calls.append(("set_desired", desired))
        webs = sorted(n for n, r in ctx.state.servers.items() if r.role == "web")
        launched = [f"web{10 + n}" for n in range(desired - len(webs))]
        retired = webs[desired:]
        for name in launched:
            ctx.state.servers[name] = ServerRecord(name, "web", "10.9.0.99", "r1")
            lb.status[name] = "UP"
        for name in retired:
            ctx.state.servers.pop(name)
            lb.status.pop(name)
        ctx.state.web_desired = desired
        ctx.state.save(ctx.paths)
        return {"launched": launched, "retired": retired}

    def replace(ctx, op, name):
        calls.append(("replace", name))
        ctx.state.servers.pop(name)
        ctx.state.servers["web9"] = ServerRecord("web9", "web", "10.9.0.98", "r1")
        ctx.state.save(ctx.paths)
        lb.status.pop(name)
        lb.status["web9"] = "UP"
        return {"retired": [name], "launched": ["web9"]}

    monkeypatch.setattr(controller_module, "open_environment", open_environment)
    monkeypatch.setattr(controller_module, "set_desired", set_desired)
    monkeypatch.setattr(controller_module, "replace", replace)
    monkeypatch.setattr(controller_module, "converge", lambda ctx, op, health=None: calls.append(("converge",)))
    auto = Controller(tmp_path / "fabula.yml", "e", out=Output(quiet=True), clock=clock)
    return SimpleNamespace(clock=clock, paths=paths, lb=lb, calls=calls, auto=auto)


def run(world, seconds: int) -> None:
    for _ in range(seconds):
        world.auto.round()
        world.clock.now += 1


def logged(world) -> list[dict]:
    path = world.paths.env_dir / "autoscaler.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sustained_demand_above_target_scales_out_as_an_operation(world):
    world.lb.rate = 18  # 9 requests/s per server for a target of 5: 4 servers needed
    run(world, 4)
    assert world.calls == [("set_desired", 4)]
    [entry] = [e for e in logged(world) if e["action"] == "scale-out"]
    assert (entry["from"], entry["to"], entry["outcome"], entry["by"]) == (2, 4, "ok", "autoscaler")
    assert "9 requests/s per server (18 on 2) is above the target 5" in entry["reason"]
    [record] = history.read(world.paths)[0]
    assert (record["action"], record["outcome"], record["details"]["decision"]) == ("autoscale", "ok", "scale-out")
    assert not lock.lock_path(world.paths).exists()


def test_no_demand_scales_in_one_at_a_time_after_the_cooldown(world):
    run(world, 19)  # the autoscaler's start counts as a change: scale-in waits 20 s
    assert world.calls == []
    run(world, 3)
    assert world.calls == [("set_desired", 1)]
    holds = [e for e in logged(world) if e["action"] == "hold"]
    assert len(holds) == 1 and "scale-in waits for its cooldown" in holds[0]["reason"]  # logged once


def test_nothing_changes_while_another_command_holds_the_lock(world):
    parent = os.getppid()  # a live process that is not this one: the lock is not stale
    holder = lock.Holder(id="d1", owner="me@host", host=lock.socket.gethostname(), pid=parent,
                         pid_start=lock.process_start(parent), boot_id=lock.boot_id(), started=lock.now_iso(),
                         action="deploy", command="fabula deploy e")
    run(world, 2)  # both seen in service
    assert lock.create_exclusively(world.paths, holder)
    world.lb.rate = 40
    world.lb.status["web1"] = "DOWN"
    run(world, 30)
    assert world.calls == []
    skips = [e for e in logged(world) if e["action"] == "skip"]
    assert len(skips) == 1 and "`fabula deploy e`" in skips[0]["reason"]
    lock.remove_if(world.paths, "d1")
    run(world, 1)  # failures are counted afresh once the deploy is done: the grace starts now
    assert world.calls == []
    run(world, 4)
    assert world.calls == [("replace", "web1")]


def test_nothing_is_kept_before_the_first_create_has_finished(world):
    """create installs the autoscaler beside the app servers; a first create that fails (or has
    not reached its load balancer yet) leaves servers nobody should heal or scale."""
    state = EnvState.load(world.paths)
    state.release = None
    state.save(world.paths)
    world.lb.rate, world.lb.status["web1"] = 40, "DOWN"
    run(world, 30)
    assert world.calls == [] and logged(world) == []
    state.release = "r1"   # the create's end: kept from now on
    state.save(world.paths)
    world.lb.status["web1"] = "UP"
    run(world, 2)
    world.lb.status["web1"] = "DOWN"
    run(world, 5)
    assert world.calls == [("replace", "web1")]


def test_a_failing_server_is_replaced_before_any_scaling(world):
    run(world, 2)
    world.lb.rate, world.lb.status["web1"] = 40, "DOWN"
    run(world, 5)
    assert world.calls[0] == ("replace", "web1")
    [entry] = [e for e in logged(world) if e["action"] == "replace"]
    assert entry["retired"] == ["web1"] and "web1 failed its health check" in entry["reason"]


def test_suspended_processes_change_nothing_and_say_so_once(world):
    state = EnvState.load(world.paths)
    state.autoscaling_suspended = ["scaling", "healing"]
    state.save(world.paths)
    world.lb.rate = 40
    run(world, 30)
    world.lb.status["web1"] = "DOWN"
    run(world, 30)
    assert world.calls == []
    reasons = [e["reason"] for e in logged(world) if e["action"] == "hold"]
    assert len([r for r in reasons if "healing is suspended" in r]) == 1
    assert len([r for r in reasons if "scaling is suspended" in r]) == 1


def test_a_failed_change_is_logged_and_retried_after_a_backoff(world, monkeypatch):
    def failing(ctx, op, desired, health=None):
        world.calls.append(("set_desired", desired))
        raise RuntimeError("boom")

    monkeypatch.setattr(controller_module, "set_desired", failing)
    world.lb.rate = 40
    run(world, 4)
    assert len(world.calls) == 1
    [entry] = [e for e in logged(world) if e["action"] == "scale-out"]
    assert (entry["outcome"], entry["error"], entry["retry_in"]) == ("failed", "boom", 15)
    run(world, 13)
    assert len(world.calls) == 1
    run(world, 2)  # 15 s after the failure
    assert len(world.calls) == 2
    assert history.read(world.paths)[0][-1]["outcome"] == "failed"


def test_a_warm_pool_refill_that_keeps_failing_holds_back_neither_healing_nor_itself_forever(world, monkeypatch):
    from fabula.autoscaling import warm_pool

    def failing(ctx, op, release):
        world.calls.append(("warm",))
        raise RuntimeError("no address left")

    monkeypatch.setattr(warm_pool, "upkeep", lambda ctx: "the warm pool has 0 of 1 server(s)")
    monkeypatch.setattr(warm_pool, "keep", failing)
    monkeypatch.setattr(controller_module, "launch_configuration", lambda ctx: None)
    run(world, 3)
    assert world.calls == [("warm",)]
    [entry] = [e for e in logged(world) if e["action"] == "warm"]
    assert (entry["outcome"], entry["retry_in"]) == ("failed", 15)
    world.lb.status["web1"] = "DOWN"   # within the refill's backoff: healing still acts
    run(world, 5)
    assert ("replace", "web1") in world.calls
    run(world, 12)   # 15 s after its failure the refill is tried again
    assert world.calls.count(("warm",)) == 2


def test_on_fixed_hosts_a_dead_host_is_recorded_once_and_brought_back_when_it_answers(world, monkeypatch):
    from fabula.autoscaling import hosts

    env = EnvironmentConfig.model_validate({
        "provider": "ssh", "ssh": {"user": "root"},
        "hosts": {"lb1": {"role": "lb", "address": "10.9.0.2"}, "web1": {"role": "web", "address": "10.9.0.10"},
                  "web2": {"role": "web", "address": "10.9.0.11"}, "cache1": {"role": "cache", "address": "10.9.0.3"},
                  "db1": {"role": "db-primary", "address": "10.9.0.4"}}})
    opened = controller_module.open_environment

    def open_fixed(config_path, env_name, out, **options):
        ctx = opened(config_path, env_name, out, **options)
        ctx.env = env
        ctx.provider.close = lambda: None
        return ctx
    up = {"web1": True, "web2": True, "cache1": True, "db1": True}
    brought: list[str] = []
    monkeypatch.setattr(controller_module, "open_environment", open_fixed)
    monkeypatch.setattr(hosts, "probe", lambda ctx: dict(up))
    monkeypatch.setattr(hosts, "bring_back", lambda ctx, name: brought.append(name) or {"restarted": True})
    up["web2"] = False
    run(world, hosts.DOWN_AFTER + 5)   # switched off for a while
    up["web2"] = True
    run(world, 3)
    records = [r for r in history.read(world.paths)[0] if r["details"].get("host") == "web2"]
    assert [(r["details"]["decision"], r["outcome"]) for r in records] == [("host down", "ok"), ("host back", "ok")]
    assert records[1]["details"]["restarted"] is True and brought == ["web2"]
    assert world.calls == []   # fixed hosts: nothing scaled, nothing replaced


def test_on_fixed_hosts_a_failed_restart_is_tried_again_after_its_backoff_only(world, monkeypatch):
    from fabula.autoscaling import hosts
    from fabula.autoscaling.controller import BACKOFF_FIRST

    env = EnvironmentConfig.model_validate({
        "provider": "ssh", "ssh": {"user": "root"},
        "hosts": {"lb1": {"role": "lb", "address": "10.9.0.2"}, "web1": {"role": "web", "address": "10.9.0.10"},
                  "cache1": {"role": "cache", "address": "10.9.0.3"},
                  "db1": {"role": "db-primary", "address": "10.9.0.4"}}})
    opened = controller_module.open_environment

    def open_fixed(config_path, env_name, out, **options):
        ctx = opened(config_path, env_name, out, **options)
        ctx.env, ctx.provider.close = env, (lambda: None)
        return ctx
    up = {"web1": False, "cache1": True, "db1": True}
    tries: list[float] = []

    def failing(ctx, name):
        tries.append(world.clock.now)
        raise RuntimeError("its supervisord does not start")
    monkeypatch.setattr(controller_module, "open_environment", open_fixed)
    monkeypatch.setattr(hosts, "probe", lambda ctx: dict(up))
    monkeypatch.setattr(hosts, "bring_back", failing)
    run(world, hosts.DOWN_AFTER)
    up["web1"] = True
    run(world, int(BACKOFF_FIRST) + 2)
    assert len(tries) == 2 and tries[1] - tries[0] >= BACKOFF_FIRST   # not once a round
