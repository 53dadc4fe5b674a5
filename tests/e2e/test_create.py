"""`fabula create` builds the seed architecture; these tests observe it as a user would."""
from __future__ import annotations

import socket
import subprocess
import time
import uuid

import httpx
import pytest

from fabula.state import EnvPaths
from tests.e2e.conftest import ENV, leftovers
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e


def client(**kwargs) -> httpx.Client:
    # the load balancer's certificate is self-signed by default; the tests check content, not trust
    return httpx.Client(verify=False, timeout=10, **kwargs)


def test_https_page_through_the_load_balancer_and_port_80_redirects(environment):
    with client() as http:
        page = http.get(environment.url + "/")
        assert page.status_code == 200
        assert "Polls on fabula" in page.text
        assert environment.describe()["release"] in page.text
        redirect = http.get(f"http://127.0.0.1:{environment.http_port}/some/page?x=1")
        assert redirect.status_code == 301
        assert redirect.headers["location"] == f"{environment.url}/some/page?x=1"
        static = http.get(environment.url + "/static/notes/style.css")
        assert static.status_code == 200 and "font-family" in static.text


def test_describe_reports_every_server_running_and_the_url(environment):
    report = environment.describe()
    assert report["url"] == environment.url + "/"
    roles = sorted(s["role"] for s in report["servers"])
    assert roles == ["cache", "db-primary", "db-replica", "web", "web", "worker"]
    assert all(s["state"] == "running" for s in report["servers"]), report["servers"]
    assert {s["name"]: s["lb"] for s in report["servers"] if s["role"] == "web"} == {"web1": "UP", "web2": "UP"}


def test_a_row_written_through_the_web_tier_is_on_the_replica(environment):
    text = f"row-{uuid.uuid4().hex}"
    with client() as http:
        written = http.post(environment.url + "/api/entries", data={"text": text})
    assert written.status_code == 201

    def on_replica() -> tuple[str, float] | None:
        count = environment.psql("db2", f"SELECT count(*) FROM notes_entry WHERE text = '{text}'")
        return (count, time.monotonic()) if count != "0" else None

    # replication lag is measured by bench/replication.py, not asserted here: a deadline only
    count, _ = wait_for(on_replica, timeout=10, interval=0.05, message="row on the replica")
    assert count == "1"  # the row once, not duplicated
    # and the app reads it back through DATABASE_REPLICA_URL
    with client() as http:
        read = http.get(environment.url + f"/api/entries/{written.json()['id']}", params={"db": "replica"})
    assert read.status_code == 200 and read.json()["text"] == text


def test_a_celery_task_enqueued_by_a_web_request_runs_on_the_worker(environment):
    text = f"task-{uuid.uuid4().hex}"
    with client() as http:
        queued = http.post(environment.url + "/api/tasks", data={"text": text})
        assert queued.status_code == 202
        task_id = queued.json()["task_id"]
        done = wait_for(lambda: (r := http.get(environment.url + f"/api/tasks/{task_id}").json())["done"] and r,
                        timeout=30, message="task done")
    assert done["worker"] == "worker1"
    assert environment.psql("db1", f"SELECT worker FROM notes_taskrecord WHERE text = '{text}'") == "worker1"


def test_a_session_started_on_one_web_server_is_seen_on_the_other(environment):
    web1, web2 = environment.address("web1"), environment.address("web2")
    with client() as http:
        first = http.get(f"https://{web1}/api/session")
        assert first.json() == {**first.json(), "count": 1, "server": "web1"}
        # the same browser session (cookie), now answered by the other web server
        session_cookie = f"sessionid={first.cookies['sessionid']}"
        second = http.get(f"https://{web2}/api/session", headers={"Cookie": session_cookie})
        assert second.json()["server"] == "web2"
        assert second.json()["count"] == 2


def reaches(environment, source: str, address: str, port: int) -> bool:
    result = environment.exec(source, "timeout", "3", "bash", "-c", f"exec 3<>/dev/tcp/{address}/{port}")
    return result.returncode == 0


def test_firewall_admits_only_what_the_architecture_needs(environment):
    db1, cache1 = environment.address("db1"), environment.address("cache1")
    assert reaches(environment, "worker1", db1, 5432)
    assert reaches(environment, "web1", cache1, 6379)
    assert not reaches(environment, "cache1", db1, 5432)
    assert not reaches(environment, "db2", cache1, 6379)
    assert not reaches(environment, "db2", cache1, 5672)
    # from the machine itself (not the load balancer's port), nothing but HTTPS to web servers
    with socket.socket() as sock:
        sock.settimeout(2)
        assert sock.connect_ex((db1, 5432)) != 0


def test_a_web_server_whose_gunicorn_stops_is_taken_out_and_requests_keep_succeeding(environment):
    assert environment.supervisorctl("web1", "stop", "gunicorn").returncode == 0
    try:
        wait_for(lambda: environment.server("web1")["lb"] == "DOWN", timeout=15, message="web1 marked DOWN")
        assert environment.server("web1")["services"]["nginx"] == "up"
        with client() as http:
            served = [http.get(environment.url + "/api/info") for _ in range(20)]
        assert [r.status_code for r in served] == [200] * 20
        assert {r.json()["server"] for r in served} == {"web2"}
    finally:
        environment.supervisorctl("web1", "start", "gunicorn")
    wait_for(lambda: environment.server("web1")["lb"] == "UP", timeout=30, message="web1 back UP")


def program_pids(environment) -> dict[str, str]:
    pids = {}
    for server in environment.describe()["servers"]:
        status = environment.supervisorctl(server["name"], "status").stdout
        for line in status.splitlines():
            parts = line.replace(",", " ").split()
            if "pid" in parts:
                pids[f"{server['name']}/{parts[0]}"] = parts[parts.index("pid") + 1]
    return pids


def test_create_again_changes_nothing(environment):
    before_pids, before_state = program_pids(environment), (environment.env_dir / "state.json").read_text()
    again = environment.fabula("create", ENV)
    assert again.returncode == 0, again.stderr
    assert program_pids(environment) == before_pids
    assert (environment.env_dir / "state.json").read_text() == before_state


def route_device(address: str) -> str | None:
    """The network device the machine would send packets to `address` through, if any."""
    words = subprocess.run(["ip", "-4", "route", "get", address], capture_output=True, text=True).stdout.split()
    return words[words.index("dev") + 1] if "dev" in words else None


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", "dev", name], capture_output=True).returncode == 0


def test_destroy_leaves_nothing_behind(environment):
    report = environment.describe()
    web1 = next(s["address"] for s in report["servers"] if s["name"] == "web1")
    # this environment's bridge (its name as the provider and force_cleanup derive it), the one
    # its servers are reached through: not just any environment's bridge on the machine
    bridge = "fb" + EnvPaths(environment.state_dir, environment.project, environment.name).tag
    assert link_exists(bridge) and route_device(web1) == bridge
    result = environment.fabula("destroy", ENV, "--yes")
    assert result.returncode == 0, result.stderr
    assert leftovers(environment) == []
    assert not link_exists(bridge)  # the environment's bridge is gone
    assert route_device(web1) != bridge
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", environment.https_port)) != 0  # nothing listens on the LB port
