"""The seed's architecture, as its user observes it: pages through the load balancer over HTTPS,
replication, Celery, sessions shared by the web servers, and each role's security group."""
from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.helpers import wait_for

pytestmark = pytest.mark.e2e


def client(**kwargs) -> httpx.Client:
    # the load balancer's certificate is self-signed by default; the tests check content, not trust
    return httpx.Client(verify=False, timeout=10, **kwargs)


def test_https_page_through_the_load_balancer_and_http_redirects(environment):
    url = environment.url
    with client() as http:
        page = http.get(url + "/")
        assert page.status_code == 200
        assert "Polls on fabula" in page.text
        assert environment.describe()["release"] in page.text
        static = http.get(url + "/static/notes/style.css")
        assert static.status_code == 200 and "font-family" in static.text
        assert page.headers["strict-transport-security"]


def test_describe_reports_every_server_running_and_in_service(environment):
    report = environment.describe()
    assert sorted(s["role"] for s in report["servers"]) == ["cache", "db-primary", "db-replica", "web", "web", "worker"]
    assert all(s["state"] == "running" for s in report["servers"]), report["servers"]
    assert all(s["lb"] == "UP" for s in report["servers"] if s["role"] == "web")
    assert report["load_balancer"]["running"] and report["exists"]


def test_a_row_written_through_the_web_tier_is_read_back_from_the_replica(environment):
    text = f"row-{uuid.uuid4().hex}"
    with client() as http:
        written = http.post(environment.url + "/api/entries", data={"text": text})
        assert written.status_code == 201
        entry = f"{environment.url}/api/entries/{written.json()['id']}"
        # the app reads it through DATABASE_REPLICA_URL once the replica has replayed it
        read = wait_for(lambda: (r := http.get(entry, params={"db": "replica"})).status_code == 200 and r,
                        timeout=10, interval=0.1, message="the row on the replica")
    assert read.json()["text"] == text


def test_a_celery_task_enqueued_by_a_web_request_runs_on_the_worker(environment):
    text = f"task-{uuid.uuid4().hex}"
    with client() as http:
        queued = http.post(environment.url + "/api/tasks", data={"text": text})
        assert queued.status_code == 202
        task_id = queued.json()["task_id"]
        done = wait_for(lambda: (r := http.get(environment.url + f"/api/tasks/{task_id}").json())["done"] and r,
                        timeout=30, message="task done")
    assert done["worker"] == environment.servers("worker")[0]["name"] and done["text"] == text


def session_on(environment, server: str, cookie: str | None = None) -> dict:
    """GET /api/session on one web server, from that server itself (through its nginx)."""
    command = ["curl", "-sk", "--max-time", "10", "-c", "-", "-o", "/dev/stderr",
               f"https://{environment.address(server)}/api/session"]
    if cookie:
        command[1:1] = ["-b", cookie]
    result = environment.exec(server, *command)
    assert result.returncode == 0, result.stderr
    cookies = {line.split("\t")[5]: line.split("\t")[6] for line in result.stdout.splitlines()
               if line.count("\t") == 6 and not line.startswith("# ")}
    return {**json.loads(result.stderr), "cookie": f"sessionid={cookies.get('sessionid', '')}"}


def test_a_session_started_on_one_web_server_is_seen_on_the_other(environment):
    first_server, second_server = (s["name"] for s in environment.servers("web"))
    first = session_on(environment, first_server)
    assert first["count"] == 1 and first["server"] == first_server
    # the same browser session (its cookie), now answered by the other web server
    second = session_on(environment, second_server, first["cookie"])
    assert second["server"] == second_server and second["count"] == 2


def reaches(environment, source: str, address: str, port: int) -> bool:
    result = environment.exec(source, "timeout", "3", "bash", "-c", f"exec 3<>/dev/tcp/{address}/{port}")
    return result.returncode == 0


def test_security_groups_admit_only_what_the_architecture_needs(environment):
    servers = {s["role"]: s for s in reversed(environment.servers())}
    db, replica, cache = (servers[r]["address"] for r in ("db-primary", "db-replica", "cache"))
    web, worker = servers["web"]["name"], servers["worker"]["name"]
    assert reaches(environment, worker, db, 5432)
    assert reaches(environment, web, cache, 6379) and reaches(environment, web, cache, 5672)
    assert reaches(environment, web, replica, 5432)
    assert not reaches(environment, servers["cache"]["name"], db, 5432)
    assert not reaches(environment, servers["db-replica"]["name"], cache, 6379)
    assert not reaches(environment, servers["db-primary"]["name"], cache, 5672)
    assert not reaches(environment, worker, servers["web"]["address"], 443)  # 443 is the load balancer's
