"""`fabula create` on the local provider: what only this provider's internals show (its ports on
this machine, its supervisors, its bridge). What any user observes of the architecture, on every
provider, is in tests/acceptance."""
from __future__ import annotations

import os
import pwd
import socket
import subprocess

import httpx
import pytest

from fabula.state import EnvPaths
from tests.e2e.local.conftest import ENV, leftovers
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e


def client(**kwargs) -> httpx.Client:
    # the load balancer's certificate is self-signed by default; the tests check content, not trust
    return httpx.Client(verify=False, timeout=10, **kwargs)


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


def shared_memory_of(uids: set[int]) -> list[str]:
    return [entry.name for entry in os.scandir("/dev/shm") if entry.stat(follow_symlinks=False).st_uid in uids]


def temporary_files_of(uids: set[int], since: float) -> list[str]:
    """What these users made in the machine's /tmp since then (an earlier environment, whose users
    had the same ids, may have left something there)."""
    found = ((entry.name, entry.stat(follow_symlinks=False)) for entry in os.scandir("/tmp"))
    return [name for name, st in found if st.st_uid in uids and st.st_mtime >= since]


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", "dev", name], capture_output=True).returncode == 0


def test_destroy_leaves_nothing_behind(environment):
    report = environment.describe()
    # a web server of this environment (web1 may have been replaced by self-healing meanwhile)
    web1 = next(s["address"] for s in report["servers"] if s["role"] == "web")
    # this environment's bridge (its name as the provider and force_cleanup derive it), the one
    # its servers are reached through: not just any environment's bridge on the machine
    bridge = "fb" + EnvPaths(environment.state_dir, environment.project, environment.name).tag
    assert link_exists(bridge) and route_device(web1) == bridge
    # PostgreSQL's dynamic shared memory, in RAM: left by a killed server unless removed
    uids = {pwd.getpwnam(name).pw_uid for name in environment.accounts.users().values()}
    assert shared_memory_of(uids), "PostgreSQL runs: it has shared memory segments in /dev/shm"
    created = (environment.env_dir / "secrets" / "secrets.json").stat().st_mtime  # written once, at create
    result = environment.fabula("destroy", ENV, "--yes")
    assert result.returncode == 0, result.stderr
    assert leftovers(environment) == []
    assert shared_memory_of(uids) == []
    # the app's temporary files (Celery's pool makes some) were in its servers' own folders
    assert temporary_files_of(uids, since=created) == []
    # its files were moved out of the way at once; their removal finishes in the background
    trash = environment.state_dir / ".trash"
    wait_for(lambda: not any(trash.iterdir()), timeout=60, message="the destroyed files removed")
    assert not link_exists(bridge)  # the environment's bridge is gone
    assert route_device(web1) != bridge
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", environment.https_port)) != 0  # nothing listens on the LB port
