"""Database operations through the real app: failover that loses no acknowledged write,
replicas rebuilt, backups that restore. One environment with synchronous replication."""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import ENV, running_environment
from tests.e2e.load import WriteLoad
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
    return {s["name"]: s for s in result.stdout and __import__("json").loads(result.stdout)["servers"]}


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


def test_replication_status_shows_streaming_synchronous_replica(env):
    status = db_status(env)
    assert status["db1"]["role"] == "db-primary" and status["db1"]["timeline"] == 1
    replica = status["db2"]
    assert (replica["state"], replica["sync_state"]) == ("streaming", "sync")
    assert replica["lag_bytes"] is not None and replica["heartbeat_lag_s"] is not None


def test_promote_refuses_when_no_replica_is_healthy_and_changes_nothing(env):
    assert env.supervisorctl("db2", "stop", "postgresql").returncode == 0
    try:
        result = env.fabula("db", "promote", ENV)
        assert result.returncode == 1 and "no healthy replica" in result.stderr
        assert db_status(env)["db1"]["role"] == "db-primary"
    finally:
        assert env.supervisorctl("db2", "start", "postgresql").returncode == 0
    wait_for(lambda: db_status(env)["db2"].get("state") == "streaming", timeout=30, message="db2 streaming again")


def test_planned_promote_under_write_load_keeps_every_acknowledged_write(env):
    old, new = primary_name(env), replica_name(env)
    load, _ = run_failover_under_load(env)
    acknowledged = [text for _, text in load.acknowledged]
    assert texts_on(env, new, acknowledged) == set(acknowledged)
    status = db_status(env)
    assert status[new]["role"] == "db-primary" and status[new]["timeline"] == 2
    assert status[old]["rebuild"] and not status[old]["up"]
    # the fenced old primary takes no connection at all: nothing runs, and its firewall drops
    assert env.exec("worker1", "timeout", "3", "bash", "-c",
                    f"exec 3<>/dev/tcp/{env.address(old)}/5432").returncode != 0


def test_reset_replicas_brings_back_a_streaming_replica(env):
    result = env.fabula("db", "reset-replicas", ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    status = db_status(env)
    replica = next(s for s in status.values() if s["role"] == "db-replica")
    assert replica["state"] == "streaming" and replica["sync_state"] == "sync" and not replica["rebuild"]
    assert "streaming" in env.fabula("describe", ENV).stdout


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


def backups_listed(env) -> list[dict]:
    listed = env.fabula("db", "backups", ENV, "--json")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def dump_of_entries(env, server: str) -> str:
    return env.psql(server, "SELECT id, text, server FROM notes_entry ORDER BY id")


def test_backup_then_drop_then_restore_gives_back_the_same_data(env, tmp_path):
    primary = primary_name(env)
    env.psql(primary, f"INSERT INTO notes_entry (text, server, created) VALUES ('{uuid.uuid4().hex}', 't', now())")
    before = dump_of_entries(env, primary)
    made = env.fabula("db", "backup", ENV, "--to", str(tmp_path))
    assert made.returncode == 0, made.stderr
    backup_file = made.stdout.strip().splitlines()[-1]
    assert Path(backup_file).parent == tmp_path  # where --to said, under the name it printed
    for path in (backup_file, backup_file + ".json"):  # root's only, and nothing else left beside
        assert os.stat(path).st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([Path(backup_file).name,
                                                                 Path(backup_file).name + ".json"])
    # without --to the backup goes to the environment's backups folder, and `db backups` lists it
    # (and only it as new) with what was recorded when it was made
    listed_before = {b["path"] for b in backups_listed(env)}
    made_default = env.fabula("db", "backup", ENV)
    assert made_default.returncode == 0, made_default.stderr
    default_file = made_default.stdout.strip().splitlines()[-1]
    listed = {b["path"]: b for b in backups_listed(env)}
    assert set(listed) - listed_before == {default_file}
    entry = listed[default_file]
    assert entry["size"] == os.stat(default_file).st_size > 0
    assert (entry["project"], entry["environment"], entry["database"]) == (env.project, ENV,
                                                                           env.project.replace("-", "_"))
    env.psql(primary, "DROP TABLE notes_entry CASCADE")
    restored = env.fabula("db", "restore", ENV, backup_file)
    assert restored.returncode == 0, restored.stderr
    assert dump_of_entries(env, primary) == before
    # the replica follows, and the app serves the data again
    wait_for(lambda: dump_of_entries(env, replica_name(env)) == before, timeout=10, message="replica restored")


def test_restoring_a_damaged_file_changes_nothing(env, tmp_path):
    primary = primary_name(env)
    before = dump_of_entries(env, primary)
    junk = tmp_path / "junk.dump"
    junk.write_bytes(b"PGDMP" + b"\x00" * 100)
    result = env.fabula("db", "restore", ENV, str(junk))
    assert result.returncode == 1 and "not a readable pg_dump archive" in result.stderr
    assert dump_of_entries(env, primary) == before


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


def test_a_backup_target_without_space_is_refused_and_leaves_nothing(env, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], check=True)
    try:
        result = env.fabula("db", "backup", ENV, "--to", str(small))
        assert result.returncode == 1 and "not enough space" in result.stderr
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
