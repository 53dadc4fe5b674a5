"""The fault matrix: one process killed at a time (kill -9 of its whole process group) on every
server of one environment, under load. Asserts the outcomes, not the times (bench/faults.py
measures those): no idempotent request fails for a fault confined to one web server; every
killed service is started again by its supervisor and serves; describe shows a service down
while it is; a task in flight when Celery dies runs again; a task enqueued while RabbitMQ is
down is refused at once with a 503 the app sends.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from fabula.operations.describe import UNIX_CONNECT
from fabula.sample import RequestLoad
from tests.e2e.local.conftest import ENV, running_environment
from tests.helpers import wait_for

BACK_WITHIN = 60  # seconds: a deadline for a service to serve again (RabbitMQ boots in ~5 s)


@pytest.fixture(scope="module")
def env():
    with running_environment("faults") as environment:
        servers = environment.describe()["servers"]
        environment.addresses = {s["name"]: s["address"] for s in servers}
        environment.roles = {s["role"]: s["name"] for s in sorted(servers, key=lambda s: s["name"])}
        yield environment


def supervisorctl(env, server: str, *args: str) -> str:
    """supervisorctl of a server (or of the load balancer, server "lb"), from the machine: its
    socket is a file of the state directory."""
    root = env.env_dir / "lb" if server == "lb" else env.env_dir / "servers" / server
    result = subprocess.run(["supervisorctl", "-c", str(root / "supervisor" / "supervisord.conf"), *args],
                            capture_output=True, text=True, timeout=30)
    return result.stdout


def program_pid(env, server: str, program: str) -> int:
    out = supervisorctl(env, server, "pid", program).strip()
    return int(out) if out.isdigit() else 0


def kill(env, server: str, program: str) -> int:
    """kill -9 of the program's process group (supervisord makes each program a group leader)."""
    pid = program_pid(env, server, program)
    assert pid > 0, f"{server}/{program} is not running before the fault"
    os.killpg(pid, signal.SIGKILL)
    return pid


ENDPOINTS = {"nginx": 443, "pgbouncer": 6432, "redis": 6379, "rabbitmq": 5672, "postgresql": 5432}


def accepts(env, server: str, program: str) -> bool:
    """The service accepts TCP connections again, tried from inside its server (what describe
    checks to call it up); programs without a port: RUNNING is all there is."""
    if program not in ENDPOINTS and program != "gunicorn":
        return True
    netns = ["ip", "netns", "exec", f"fab.{env.project}.{ENV}.{server}"]
    if program == "gunicorn":   # nginx's way in: its Unix socket
        socket = env.env_dir / "servers" / server / "run" / "gunicorn" / "gunicorn.sock"
        return subprocess.run([*netns, "python3", "-c", UNIX_CONNECT, str(socket)], capture_output=True,
                              timeout=10).returncode == 0
    address = "127.0.0.1" if program == "pgbouncer" else env.addresses[server]
    return subprocess.run([*netns, "bash", "-c", f"exec 3<>/dev/tcp/{address}/{ENDPOINTS[program]}"],
                          capture_output=True, timeout=10).returncode == 0


def wait_back(env, server: str, program: str, old_pid: int) -> None:
    """Its supervisor started a new process, it is RUNNING and serves."""
    def back():
        pid = program_pid(env, server, program)
        return (pid not in (0, old_pid) and "RUNNING" in supervisorctl(env, server, "status", program)
                and (server == "lb" or accepts(env, server, program)))
    wait_for(back, BACK_WITHIN, interval=0.1, message=f"{server}/{program} started again and serving")


def all_web_up(env) -> bool:
    return set(env.web_health().values()) == {"UP"}


def failures(load: RequestLoad) -> dict[str, int]:
    return {outcome: n for outcome, n in load.counts().items() if outcome != "200"}


def test_web_faults_fail_no_idempotent_request(env):
    """nginx, gunicorn and PgBouncer killed in turn on the web servers, under a steady load of
    GETs that query the database through PgBouncer: every one of them is answered 200."""
    wait_for(lambda: all_web_up(env), 60, message="both web servers UP")
    with RequestLoad(env.url, path="/api/entries") as load:
        time.sleep(1)
        for server, program in (("web1", "nginx"), ("web2", "gunicorn"), ("web1", "pgbouncer")):
            old = kill(env, server, program)
            wait_back(env, server, program, old)
            wait_for(lambda: all_web_up(env), 60, message=f"both web servers UP after {server}/{program}")
            time.sleep(0.5)
    counts = load.counts()
    assert counts.get("200", 0) > 100, counts
    assert not failures(load), f"failed idempotent requests: {counts}"


def test_redis_killed_fails_nothing_once_it_is_back(env):
    """Requests that need Redis (sessions) may fail while it is down, and none once it is back."""
    old = kill(env, "cache1", "redis")
    wait_back(env, "cache1", "redis", old)
    with httpx.Client(verify=False, timeout=15) as http:
        statuses = [http.get(env.url + "/api/session").status_code for _ in range(20)]
    assert statuses == [200] * 20


def describe_while_down(env, server: str, program: str) -> list[str]:
    """What describe says of the program in every call that ended while the program certainly
    did not serve yet (before the last probe that found it down started)."""
    last_refused, calls = [time.monotonic()], []
    done = threading.Event()

    def probe():
        while not done.is_set():
            started = time.monotonic()
            if accepts(env, server, program):
                return
            last_refused[0] = started
            time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    while prober.is_alive() and len(calls) < 30:
        state = env.server(server)["services"][program]
        calls.append((time.monotonic(), state))
    done.set()
    prober.join()
    return [state for ended, state in calls if ended < last_refused[0]]


def test_rabbitmq_down_refuses_tasks_with_503_then_delivers(env):
    old = kill(env, "cache1", "rabbitmq")
    # RabbitMQ takes seconds to boot: meanwhile a task is refused at once, describe shows it down
    with ThreadPoolExecutor(1) as pool, httpx.Client(verify=False, timeout=30) as http:
        described = pool.submit(describe_while_down, env, "cache1", "rabbitmq")
        started = time.monotonic()
        refused = http.post(env.url + "/api/tasks", data={"text": "while rabbitmq is down"})
        took = time.monotonic() - started
        assert refused.status_code == 503, refused.text
        assert "task queue is unavailable" in refused.json()["error"]
        assert took < 10, f"the refusal took {took:.1f}s"
        # (on a machine so slow that no describe ends before RabbitMQ is back, there is nothing to check)
        assert "up" not in described.result()
        wait_back(env, "cache1", "rabbitmq", old)
        accepted = http.post(env.url + "/api/tasks", data={"text": "after rabbitmq is back"})
        assert accepted.status_code == 202, accepted.text
        task = accepted.json()["task_id"]
        wait_for(lambda: http.get(f"{env.url}/api/tasks/{task}").json()["done"], 120,
                 message="the task enqueued after RabbitMQ came back ran")


def test_celery_killed_runs_its_task_again(env):
    with httpx.Client(verify=False, timeout=30) as http:
        accepted = http.post(env.url + "/api/tasks", data={"text": "cut by a kill", "seconds": "4"})
        assert accepted.status_code == 202, accepted.text
        task = accepted.json()["task_id"]
        log = env.env_dir / "servers" / "worker1" / "log" / "celery.log"
        wait_for(lambda: task in log.read_text(errors="replace"), 30, interval=0.1,
                 message="the worker received the task")
        time.sleep(1)  # in its sleep: the task is cut before it writes anything
        old = kill(env, "worker1", "celery")
        wait_back(env, "worker1", "celery", old)
        wait_for(lambda: http.get(f"{env.url}/api/tasks/{task}").json()["done"], 120,
                 message="the task cut by the kill ran again")
    assert env.psql(env.roles["db-primary"], f"SELECT count(*) FROM notes_entry WHERE text = 'ran {task}'") == "1"


@pytest.mark.parametrize("role, program", [("worker", "celerybeat"), ("worker", "pgbouncer"),
                                           ("db-replica", "postgresql"), ("db-primary", "postgresql")])
def test_killed_service_comes_back(env, role, program):
    server = env.roles[role]
    old = kill(env, server, program)
    wait_back(env, server, program, old)


def test_database_serves_after_its_faults(env):
    with httpx.Client(verify=False, timeout=15) as http:
        wrote = wait_for(lambda: (r := http.post(env.url + "/api/entries", data={"text": "after"})).status_code == 201
                         and r, 60, message="a write after the primary came back")
        entry = wrote.json()["id"]
        wait_for(lambda: http.get(f"{env.url}/api/entries/{entry}?db=replica").status_code == 200, 60,
                 message="the replica streams again")


def test_haproxy_killed_keeps_its_sockets_and_loses_at_most_the_requests_in_flight(env):
    """HAProxy's processes (master and worker: their process group) killed under load: its
    listening sockets stay with the socket holder, a new HAProxy takes them at once, and the
    only requests that can fail are the one each client had in flight."""
    pidfile, holder = env.env_dir / "lb" / "haproxy.pid", program_pid(env, "lb", "haproxy")
    with RequestLoad(env.url) as load:
        wait_for(lambda: len(load.outcomes) > 20, 30, message="load running")
        old = int(pidfile.read_text())
        os.killpg(old, signal.SIGKILL)
        wait_for(lambda: int(pidfile.read_text()) != old, BACK_WITHIN, interval=0.05, message="a new HAProxy")
        back = time.monotonic()
        wait_for(lambda: sum(1 for at, outcome, _ in load.outcomes if at > back and outcome == "200") > 20, 30,
                 message="requests served by the new HAProxy")
    failed = [outcome for _, outcome, _ in load.outcomes if outcome != "200"]
    assert len(failed) <= len(load.threads), f"more than the requests in flight failed: {load.counts()}"
    assert program_pid(env, "lb", "haproxy") == holder  # the sockets' holder was not touched


def test_load_balancer_programs_come_back(env):
    # the socket holder itself killed (HAProxy runs on): the new holder takes the ports over
    old = kill(env, "lb", "haproxy")
    wait_back(env, "lb", "haproxy", old)
    with httpx.Client(verify=False, timeout=15) as http:
        assert http.get(env.url + "/api/info").status_code == 200
    old = kill(env, "lb", "autoscaler")
    wait_back(env, "lb", "autoscaler", old)


def test_describe_shows_everything_up_again(env):
    report = env.describe()
    assert report["load_balancer"]["services"] == {"autoscaler": "up", "haproxy": "up"}
    down = {f"{s['name']}/{name}": state for s in report["servers"] for name, state in s["services"].items()
            if state != "up"}
    assert not down


def test_whole_web_server_killed_fails_no_idempotent_request(env):
    """Every process of web2's namespace killed (its supervisor too): requests go to web1."""
    suspended = env.fabula("autoscaling", ENV, "suspend", "--process", "healing")
    assert suspended.returncode == 0, suspended.stderr   # no replacement racing the destroy
    with RequestLoad(env.url, path="/api/entries") as load:
        time.sleep(1)
        pids = subprocess.run(["ip", "netns", "pids", f"fab.{env.project}.{ENV}.web2"], capture_output=True,
                              text=True).stdout.split()
        assert pids
        subprocess.run(["kill", "-9", *pids], check=True)
        wait_for(lambda: env.web_health()["web2"] == "DOWN", 30, message="web2 marked DOWN")
        time.sleep(2)
    counts = load.counts()
    assert counts.get("200", 0) > 20, counts
    assert not failures(load), f"failed idempotent requests: {counts}"
