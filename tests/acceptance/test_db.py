"""Database operations as a user runs them: synchronous replication seen by `fabula db status`,
a planned promote under write load that keeps every acknowledged write, replicas rebuilt, and
backups that restore (or are refused before they change anything)."""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from fabula.sample import WriteLoad
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e


def db_status(environment) -> dict[str, dict]:
    result = environment.fabula("db", "status", environment.name, "--json")
    assert result.returncode == 0, result.stderr
    return {s["name"]: s for s in json.loads(result.stdout)["servers"]}


def named(environment, role: str) -> str:
    return next(name for name, s in db_status(environment).items() if s["role"] == role)


def texts_on(environment, server: str, texts: list[str]) -> set[str]:
    """Which of `texts` are rows of notes_entry on `server` (one query)."""
    found = environment.query("SELECT text FROM notes_entry WHERE text LIKE 'load-%'", server)
    return set(found.split()) & set(texts)


def test_replication_status_shows_a_streaming_synchronous_replica(environment):
    status = db_status(environment)
    primary, replica = named(environment, "db-primary"), named(environment, "db-replica")
    assert status[primary]["up"] and status[primary]["timeline"] == 1
    assert (status[replica]["state"], status[replica]["sync_state"]) == ("streaming", "sync")
    assert status[replica]["lag_bytes"] is not None and status[replica]["heartbeat_lag_s"] is not None


def test_planned_promote_under_write_load_keeps_every_acknowledged_write(environment):
    old, new = named(environment, "db-primary"), named(environment, "db-replica")
    load = WriteLoad(environment.url, max_seconds=120)
    load.start()
    try:
        wait_for(lambda: len(load.acknowledged) >= 20, timeout=30, message="writes acknowledged before")
        promoted = environment.fabula("db", "promote", environment.name, timeout=300)
        assert promoted.returncode == 0, promoted.stderr
        done = time.monotonic()
        wait_for(lambda: load.acknowledged_since(done) >= 20, timeout=15, message="writes after promote")
    finally:
        load.stop()
    acknowledged = [text for _, text in load.acknowledged]
    assert texts_on(environment, new, acknowledged) == set(acknowledged)
    status = db_status(environment)
    assert status[new]["role"] == "db-primary" and status[new]["timeline"] == 2
    assert status[old]["rebuild"] and not status[old]["up"]
    # the fenced old primary takes no connection at all
    assert environment.exec("worker1", "timeout", "3", "bash", "-c",
                            f"exec 3<>/dev/tcp/{environment.address(old)}/5432").returncode != 0


def test_reset_replicas_brings_back_a_streaming_synchronous_replica(environment):
    result = environment.fabula("db", "reset-replicas", environment.name, timeout=300)
    assert result.returncode == 0, result.stderr
    replica = db_status(environment)[named(environment, "db-replica")]
    assert replica["state"] == "streaming" and replica["sync_state"] == "sync" and not replica["rebuild"]
    assert "streaming" in environment.fabula("describe", environment.name).stdout


def backups_listed(environment) -> list[dict]:
    listed = environment.fabula("db", "backups", environment.name, "--json")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def entries(environment, server: str | None = None) -> str:
    return environment.query("SELECT id, text, server FROM notes_entry ORDER BY id", server)


def test_backup_then_drop_then_restore_gives_back_the_same_data(environment, tmp_path):
    env = environment
    env.query(f"INSERT INTO notes_entry (text, server, created) VALUES ('{uuid.uuid4().hex}', 't', now())")
    before = entries(env)
    made = env.fabula("db", "backup", env.name, "--to", str(tmp_path))
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
    made_default = env.fabula("db", "backup", env.name)
    assert made_default.returncode == 0, made_default.stderr
    default_file = made_default.stdout.strip().splitlines()[-1]
    listed = {b["path"]: b for b in backups_listed(env)}
    assert set(listed) - listed_before == {default_file}
    entry = listed[default_file]
    assert entry["size"] == os.stat(default_file).st_size > 0
    project = env.project
    assert (entry["project"], entry["environment"], entry["database"]) == (project, env.name,
                                                                           project.replace("-", "_"))
    env.query("DROP TABLE notes_entry CASCADE")
    restored = env.fabula("db", "restore", env.name, backup_file)
    assert restored.returncode == 0, restored.stderr
    assert entries(env) == before
    # the replica follows
    replica = named(env, "db-replica")
    wait_for(lambda: entries(env, replica) == before, timeout=10, message="replica restored")


def test_restoring_a_damaged_file_changes_nothing(environment, tmp_path):
    before = entries(environment)
    junk = tmp_path / "junk.dump"
    junk.write_bytes(b"PGDMP" + b"\x00" * 100)
    result = environment.fabula("db", "restore", environment.name, str(junk))
    assert result.returncode == 1 and "not a readable pg_dump archive" in result.stderr
    assert entries(environment) == before


def test_a_backup_target_without_space_is_refused_and_leaves_nothing(environment, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], check=True)
    try:
        result = environment.fabula("db", "backup", environment.name, "--to", str(small))
        assert result.returncode == 1 and "not enough space" in result.stderr
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
