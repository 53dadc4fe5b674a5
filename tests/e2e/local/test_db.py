"""The local provider's own database checks, which need its internals (supervisorctl, the
namespace's processes, a dump made on the server): promote refused without a healthy replica,
an emergency promote after the primary's machine dies, a foreign backup refused. The
provider-neutral database scenarios are in tests/acceptance/test_db.py."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from fabula.sample import WriteLoad
from tests.e2e.local.conftest import ENV, running_environment
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

SERVERS = "{web: 2, worker: 1, cache: 1, db-primary: 1, db-replica: 1}"


@pytest.fixture(scope="module")
def env():
    with running_environment("db", servers=SERVERS, extra="    db: {synchronous: true}\n") as environment:
        yield environment


def db_status(env) -> dict:
    result = env.fabula("db", "status", ENV, "--json")
    assert result.returncode == 0, result.stderr
    return {s["name"]: s for s in json.loads(result.stdout)["servers"]}


def texts_on(env, server: str, texts: list[str]) -> set[str]:
    """Which of `texts` are rows of notes_entry on `server` (checked in one query)."""
    found = env.psql(server, "SELECT text FROM notes_entry WHERE text LIKE 'load-%'")
    return set(found.split()) & set(texts)


def primary_name(env) -> str:
    return next(name for name, s in db_status(env).items() if s["role"] == "db-primary")


def replica_name(env) -> str:
    return next(name for name, s in db_status(env).items() if s["role"] == "db-replica")


def run_failover_under_load(env, before_promote=None) -> tuple[WriteLoad, dict]:
    load = WriteLoad(env.url, max_seconds=120)
    load.start()
    try:
        wait_for(lambda: len(load.acknowledged) >= 20, timeout=30, message="writes acknowledged before")
        if before_promote:
            before_promote()
        promoted = env.fabula("db", "promote", ENV, timeout=300)
        assert promoted.returncode == 0, promoted.stderr
        done = time.monotonic()
        # the app takes writes again soon after promote returns
        wait_for(lambda: load.acknowledged_since(done) >= 20, timeout=15, message="writes after promote")
    finally:
        load.stop()
    return load, {"stdout": promoted.stdout, "stderr": promoted.stderr}


def test_promote_refuses_when_no_replica_is_healthy_and_changes_nothing(env):
    assert env.supervisorctl("db2", "stop", "postgresql").returncode == 0
    try:
        result = env.fabula("db", "promote", ENV)
        assert result.returncode == 1 and "no healthy replica" in result.stderr
        assert db_status(env)["db1"]["role"] == "db-primary"
    finally:
        assert env.supervisorctl("db2", "start", "postgresql").returncode == 0
    wait_for(lambda: db_status(env)["db2"].get("state") == "streaming", timeout=30, message="db2 streaming again")


def test_emergency_promote_after_kill_9_loses_no_acknowledged_write(env):
    old, new = primary_name(env), replica_name(env)
    netns = f"fab.{env.project}.{ENV}.{old}"

    def kill_primary():
        pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
        subprocess.run(["kill", "-9", *pids], check=True)

    load, promoted = run_failover_under_load(env, before_promote=kill_primary)
    assert "emergency" in promoted["stderr"]
    acknowledged = [text for _, text in load.acknowledged]
    assert len(acknowledged) > 40
    assert texts_on(env, new, acknowledged) == set(acknowledged)
    # and the environment heals: the old primary is rebuilt as a replica
    assert env.fabula("db", "reset-replicas", ENV, timeout=300).returncode == 0
    assert db_status(env)[old]["state"] == "streaming"


def dump_of_entries(env, server: str) -> str:
    return env.psql(server, "SELECT id, text, server FROM notes_entry ORDER BY id")


def test_restoring_another_databases_backup_is_refused(env):
    primary = primary_name(env)
    dump = env.env_dir / "servers" / primary / "tmp" / "foreign.dump"
    socket_dir = env.env_dir / "servers" / primary / "run" / "postgresql"
    made = env.exec(primary, "sh", "-c", f"runuser -u {env.accounts.db} -- pg_dump -Fc -U postgres -h {socket_dir} "
                    f"-d postgres > {dump}")
    assert made.returncode == 0, made.stderr
    before = dump_of_entries(env, primary)
    result = env.fabula("db", "restore", ENV, str(dump))
    assert result.returncode == 1 and "backup of database 'postgres'" in result.stderr
    assert dump_of_entries(env, primary) == before


