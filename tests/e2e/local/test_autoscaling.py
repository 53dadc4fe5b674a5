"""The web tier as an autoscaling group, on real services: `fabula scale`, suspending the
autoscaler, self-healing (a web server whose processes are all killed is replaced), no change
while another command holds the lock, and scaling out under load and back in when it stops."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest

from fabula.environment import lock
from fabula.state import EnvPaths
from tests.e2e.local.conftest import ENV, leftovers, running_environment
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

SERVERS = "{web: 2, worker: 1, cache: 1, db-primary: 1, db-replica: 0}"
MIN, DESIRED, MAX, TARGET = 1, 2, 3, 4      # TARGET: requests per second per web server
GRACE, SCALE_IN_COOLDOWN = 3, 10
AUTOSCALING = (f"    autoscaling: {{min: {MIN}, desired: {DESIRED}, max: {MAX}, metric: requests, target: {TARGET}, "
               f"scale_out_cooldown: 5, scale_in_cooldown: {SCALE_IN_COOLDOWN}, health_grace: {GRACE}, "
               f"interval: 1, window: 4}}\n")
FIGURES: dict[str, float] = {}


@pytest.fixture(scope="module")
def env():
    try:
        with running_environment("scale", servers=SERVERS, extra=AUTOSCALING) as environment:
            yield environment
            # destroy stops the autoscaler (its command line names the environment's directory, so
            # leftovers() sees it) and everything else: checked here, right after destroy and before
            # running_environment's safety net force-cleans whatever is left (its own destroy is then
            # a no-op on an environment that is gone)
            destroyed = environment.fabula("destroy", ENV, "--yes", timeout=300)
            assert destroyed.returncode == 0, destroyed.stderr
            assert leftovers(environment) == []
    finally:
        if FIGURES:
            print("\nautoscaling figures: " + ", ".join(f"{k} {v:.1f}s" for k, v in FIGURES.items()))


# -- looking at the environment without the CLI (describe takes seconds) -------------------------

def web_servers(env) -> list[str]:
    state = json.loads((env.env_dir / "state.json").read_text())
    return sorted((n for n, s in state["servers"].items() if s["role"] == "web"), key=lambda n: int(n[3:]))


def up(env) -> set[str]:
    return {n for n, status in env.web_health().items() if status == "UP"}


def decisions(env) -> list[dict]:
    path = env.env_dir / "autoscaler.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def group_is(env, count: int):
    """The group has `count` web servers, all of them in service and nothing else in the LB."""
    servers = web_servers(env)
    return len(servers) == count and up(env) == set(env.web_health()) == set(servers)


def kill_server(env, name: str) -> float:
    """kill -9 every process of the server's namespace; returns when."""
    netns = f"fab.{env.project}.{ENV}.{name}"
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=True).stdout.split()
    assert pids, f"no processes in {netns}"
    killed_at = time.monotonic()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    return killed_at


class RateLoad:
    """GET /api/info through the load balancer at about `rate` requests per second from keep-alive
    clients, for at most max_seconds; records when each response came and from which server."""

    def __init__(self, url: str, rate: float, clients: int = 4, max_seconds: float = 240):
        self.url, self.rate, self.clients, self.max_seconds = url, rate, clients, max_seconds
        self.outcomes: list[tuple[float, str, str]] = []   # (time, status or error, server)
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        started = time.monotonic()
        pace = self.clients / self.rate
        with httpx.Client(verify=False, timeout=15) as http:
            next_at = time.monotonic()
            while not self.stop_event.is_set() and time.monotonic() - started < self.max_seconds:
                try:
                    response = http.get(self.url + "/api/info")
                    outcome = str(response.status_code)
                    server = response.json().get("server", "") if response.status_code == 200 else ""
                except (httpx.HTTPError, ValueError) as exc:
                    outcome, server = type(exc).__name__, ""
                with self._lock:
                    self.outcomes.append((time.monotonic(), outcome, server))
                next_at += pace
                self.stop_event.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> RateLoad:
        self.started = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=30)

    def first_from(self, servers: set[str], after: float = 0) -> float | None:
        with self._lock:
            return next((at for at, _, server in self.outcomes if server in servers and at > after), None)

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for _, outcome, _ in self.outcomes:
            found[outcome] = found.get(outcome, 0) + 1
        return found


# -- the tests -----------------------------------------------------------------------------------

def test_create_starts_the_autoscaler_and_describe_shows_the_group(env):
    report = env.describe()["autoscaling"]
    assert {k: report[k] for k in ("configured", "min", "max", "metric", "target")} == {
        "configured": True, "min": MIN, "max": MAX, "metric": "requests", "target": TARGET}
    # created with DESIRED; with no load the autoscaler may already have scaled in towards min
    assert MIN <= report["desired"] <= DESIRED and report["controller"] == "running" and report["suspended"] == []
    table = env.fabula("describe", ENV)
    assert f"(min {MIN}, max {MAX}), autoscaling" in table.stdout and "autoscaler running" in table.stdout


def test_scale_refuses_a_count_outside_min_max(env):
    result = env.fabula("scale", ENV, "--desired", str(MAX + 1))
    assert result.returncode == 2
    assert f"desired {MAX + 1} is outside the web group's min..max ({MIN}..{MAX})" in result.stderr
    history = json.loads(env.fabula("history", ENV, "--json").stdout)
    assert "scale" not in [r["action"] for r in history]  # bad input: not even the lock was taken


def test_scale_sets_the_desired_count_and_converges_now(env):
    # scaling suspended: with no load, the autoscaler would otherwise shrink the group to min
    suspended = env.fabula("autoscaling", ENV, "suspend", "--process", "scaling")
    assert suspended.returncode == 0, suspended.stderr
    assert "suspended processes: scaling" in suspended.stdout
    before = web_servers(env)
    result = env.fabula("scale", ENV, "--desired", "3", "--json")
    assert result.returncode == 0, result.stderr
    launched = json.loads(result.stdout)["launched"]
    assert len(launched) == 3 - len(before) and group_is(env, 3) and set(before) < set(web_servers(env))
    newest = web_servers(env)[-1]
    result = env.fabula("scale", ENV, "--desired", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["retired"] == [newest]  # the newest leaves first
    assert newest not in web_servers(env)
    # the scale-in reloads HAProxy: its new process starts every server "UP 1/2" (up, one failed
    # check from out) until its first check of it passes, within a check interval (1 s)
    wait_for(lambda: group_is(env, 2), timeout=5, message="the group of 2 all UP in the load balancer")
    report = env.describe()["autoscaling"]
    assert report["desired"] == 2 and report["suspended"] == ["scaling"]
    assert [(d["action"], d.get("to")) for d in decisions(env) if d["by"] != "autoscaler"] == \
        [("suspend", None), ("scale", 3), ("scale", 2)]
    history = json.loads(env.fabula("history", ENV, "--json").stdout)
    assert [r["action"] for r in history[-3:]] == ["suspend autoscaling", "scale", "scale"]


def test_a_web_server_whose_processes_all_die_is_replaced(env):
    assert group_is(env, 2)
    before = set(web_servers(env))
    victim = min(before, key=lambda n: int(n[3:]))
    with RateLoad(env.url, rate=4) as load:
        wait_for(lambda: len(load.outcomes) > 5, timeout=30, message="load running")
        killed_at = kill_server(env, victim)
        wait_for(lambda: victim not in web_servers(env) and group_is(env, 2), timeout=120,
                 message=f"{victim} replaced and 2 web servers in service")
        replacement = set(web_servers(env)) - before
        serving_at = wait_for(lambda: load.first_from(replacement, after=killed_at), timeout=30,
                              message=f"{replacement} taking traffic")
    FIGURES["death to replacement taking traffic"] = serving_at - killed_at
    # logged once the operation has ended, just after the state shows the new group
    entry = wait_for(lambda: next((d for d in reversed(decisions(env)) if d["action"] == "replace"), None),
                     timeout=30, message="the replacement logged")
    assert entry["outcome"] == "ok" and entry["retired"] == [victim] and set(entry["launched"]) == replacement
    assert f"{victim} failed its health check for" in entry["reason"] and "after being in service" in entry["reason"]
    record = json.loads(env.fabula("history", ENV, "--json").stdout)[-1]
    assert (record["action"], record["outcome"], record["details"]["replaced"]) == ("autoscale", "ok", victim)


def test_no_change_while_another_command_holds_the_lock(env):
    """A deploy (here: this test, holding the lock as `fabula deploy`) and the autoscaler never
    fight: a dead server is replaced only once the lock is free again."""
    paths = EnvPaths(env.state_dir, env.project, ENV)
    holder = lock.Holder.of_this_process("deploy", f"fabula deploy {ENV}")
    wait_for(lambda: lock.create_exclusively(paths, holder), timeout=60, message="the lock taken")
    try:
        victim = web_servers(env)[0]
        kill_server(env, victim)
        wait_for(lambda: env.web_health().get(victim, "").startswith("DOWN"), timeout=30, message=f"{victim} down")
        down_since = time.monotonic()
        wait_for(lambda: any(d["action"] == "skip" and f"`fabula deploy {ENV}`" in d["reason"]
                             for d in decisions(env)), timeout=30, message="the autoscaler skipping its rounds")
        # well past health_grace: the autoscaler would have replaced it by now if it could
        wait_for(lambda: time.monotonic() - down_since > GRACE + 5, timeout=GRACE + 10)
        assert victim in web_servers(env) and not any(
            d["action"] == "replace" and d.get("retired") == [victim] for d in decisions(env))
    finally:
        lock.remove_if(paths, holder.id)
    wait_for(lambda: victim not in web_servers(env) and group_is(env, 2), timeout=120,
             message=f"{victim} replaced once the lock is free")


def test_the_group_grows_under_load_within_max_and_shrinks_back_to_min(env):
    resumed = env.fabula("autoscaling", ENV, "resume")
    assert resumed.returncode == 0 and "suspended processes: none" in resumed.stdout
    # no load: one server fewer is always below target, so it shrinks to min after the cooldown
    wait_for(lambda: group_is(env, MIN), timeout=SCALE_IN_COOLDOWN + 60, message=f"the group at min {MIN}")
    first = set(web_servers(env))
    peak = [0]

    def watch():
        peak[0] = max(peak[0], len(env.web_health()))
        return False

    # 10 requests/s for a target of 4 per server: 3 servers (the max) are needed
    with RateLoad(env.url, rate=10) as load:
        wait_for(lambda: watch() or group_is(env, MAX), timeout=120, interval=0.5,
                 message=f"the group at max {MAX} under load")
        new = set(web_servers(env)) - first
        # (the servers may all come into service at once: the first request they serve is a moment later)
        wait_for(lambda: load.first_from(new, after=load.started) is not None, timeout=30, interval=0.2,
                 message="a request served by a new server")
        taking = load.first_from(new, after=load.started)
        FIGURES["load step to a new server taking traffic"] = taking - load.started
        FIGURES["load step to the group at max"] = time.monotonic() - load.started
        for _ in range(10):  # it stays at max while the load lasts
            watch()
            assert len(web_servers(env)) == MAX
            time.sleep(0.5)
    stopped = time.monotonic()
    assert load.counts() == {"200": len(load.outcomes)}, load.counts()
    wait_for(lambda: watch() or group_is(env, MIN), timeout=3 * SCALE_IN_COOLDOWN + 90, interval=0.5,
             message=f"the group back at min {MIN} after the load")
    FIGURES["load stop to the group back at min"] = time.monotonic() - stopped
    assert peak[0] <= MAX

    def scaled() -> list[dict]:
        return [d for d in decisions(env) if d["action"] in ("scale-out", "scale-in") and d.get("outcome") == "ok"]

    # the decision is logged once its operation has ended, just after the state shows the new group
    wait_for(lambda: scaled()[-1]["action"] == "scale-in" and scaled()[-1]["to"] == MIN, timeout=30,
             message="the scale-in to min logged")
    assert all(MIN <= d["to"] <= MAX for d in scaled())
    assert any(d["action"] == "scale-out" and "above the target" in d["reason"] for d in scaled())
    report = env.describe()["autoscaling"]
    assert report["desired"] == MIN and report["in_service"] == MIN
