"""The web group's warm pool (`autoscaling.warm`) on real services: the autoscaler keeps a web
server started out of the load balancer; a scale-out puts that one in service (no launch), and
the pool is refilled; after a deploy the pool runs the group's new release."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.e2e.local.conftest import ENV, leftovers, running_environment
from tests.helpers import commit_files, wait_for

pytestmark = pytest.mark.e2e

SERVERS = "{web: 1, worker: 1, cache: 1, db-primary: 1, db-replica: 0}"
# scaling suspended by the tests before they scale: no demand would make the autoscaler shrink the group
AUTOSCALING = ("    autoscaling: {min: 1, desired: 1, max: 2, metric: requests, target: 1000, health_grace: 3, "
               "interval: 1, warm: 1}\n")


@pytest.fixture(scope="module")
def env():
    with running_environment("warm", servers=SERVERS, extra=AUTOSCALING) as environment:
        yield environment
        destroyed = environment.fabula("destroy", ENV, "--yes", timeout=300)
        assert destroyed.returncode == 0, destroyed.stderr
        assert leftovers(environment) == []


def servers(env) -> dict[str, dict]:
    return json.loads((env.env_dir / "state.json").read_text())["servers"]


def pool(env) -> list[str]:
    return sorted(n for n, s in servers(env).items() if s.get("warm"))


def members(env) -> list[str]:
    return sorted(n for n, s in servers(env).items() if s["role"] == "web" and not s.get("warm"))


def warmed(env, release: str | None = None) -> str | None:
    """The pool's one server once the autoscaler has finished starting it (of `release`)."""
    entries = [json.loads(line) for line in (env.env_dir / "autoscaler.jsonl").read_text().splitlines()]
    done = {n for e in entries if e.get("action") == "warm" and e.get("outcome") == "ok" for n in e.get("warmed", [])}
    ready = [n for n in pool(env) if n in done and release in (None, servers(env)[n]["release"])]
    return ready[0] if ready else None


def test_the_autoscaler_keeps_a_server_warm_out_of_the_load_balancer(env):
    warm = wait_for(lambda: warmed(env), 120, message="a warm server started")
    assert members(env) == ["web1"] and warm not in env.web_health()
    report = env.describe()
    assert report["autoscaling"]["warm"] == {"wanted": 1, "servers": [warm]}
    [server] = [s for s in report["servers"] if s["name"] == warm]
    assert server["warm"] and server["state"] == "running" and server["lb"] is None
    assert f"warm pool: 1 of 1 ({warm})" in env.fabula("describe", ENV).stdout


def test_a_scale_out_puts_the_warm_server_in_service_and_the_pool_is_refilled(env):
    suspended = env.fabula("autoscaling", ENV, "suspend", "--process", "scaling")
    assert suspended.returncode == 0, suspended.stderr
    warm = wait_for(lambda: warmed(env), 120, message="a warm server started")
    result = env.fabula("scale", ENV, "--desired", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["launched"] == [warm]   # taken, not launched
    assert members(env) == sorted(["web1", warm]) and env.web_health()[warm] == "UP"
    with httpx.Client(verify=False, timeout=10) as http:
        answered = {http.get(env.url + "/api/info").json()["server"] for _ in range(20)}
    assert warm in answered
    refill = wait_for(lambda: warmed(env) not in (None, warm) and warmed(env), 120, message="the pool refilled")
    assert refill not in env.web_health()


def test_after_a_deploy_the_pool_runs_the_groups_new_release(env):
    commit = commit_files(env.app_dir, "a new release", {"CHANGES.txt": "warm pool\n"})
    deployed = env.fabula("deploy", ENV, timeout=600)
    assert deployed.returncode == 0, deployed.stderr
    release = commit[:12]
    warm = wait_for(lambda: warmed(env, release), 120, message="the pool started again from the new release")
    assert pool(env) == [warm] and warm not in env.web_health()
