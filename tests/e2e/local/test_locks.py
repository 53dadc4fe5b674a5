"""Locks, history and private files on a real (small) environment: every command that changes it
holds its lock and is recorded; `destroy` is refused while another command holds the lock, and
breaks it with --force; database dumps are root's only, and never written through a symlink."""
from __future__ import annotations

import json
import os
import stat

import pytest

from fabula.environment import lock
from fabula.state import EnvPaths
from tests.e2e.local.conftest import ENV, leftovers, running_environment

pytestmark = pytest.mark.e2e

SERVERS = "{web: 1, worker: 1, cache: 1, db-primary: 1, db-replica: 0}"


@pytest.fixture(scope="module")
def env():
    with running_environment("locks", servers=SERVERS) as environment:
        yield environment


def paths(env) -> EnvPaths:
    return EnvPaths(env.state_dir, env.project, ENV)


def history(env) -> list[dict]:
    result = env.fabula("history", ENV, "--json", "-n", "100")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_state_is_in_its_own_directory_and_history_and_lock_are_root_only(env):
    assert (env.state_dir / env.project / ENV / "state.json").exists()
    assert mode(paths(env).history_file) == 0o600
    assert mode(paths(env).secrets_dir) == 0o700


def test_a_backup_is_a_root_only_file_in_a_root_only_folder(env):
    made = env.fabula("db", "backup", ENV)
    assert made.returncode == 0, made.stderr
    dump = made.stdout.strip().splitlines()[-1]
    folder = env.state_dir / "backups" / env.project / ENV
    assert os.path.dirname(dump) == str(folder)
    assert mode(folder) == 0o700 and os.lstat(folder).st_uid == 0
    assert mode(dump) == 0o600 and mode(dump + ".json") == 0o600
    assert [f.name for f in folder.iterdir()] and not [f for f in folder.iterdir() if f.name.startswith(".")]
    record = history(env)[-1]
    assert (record["action"], record["outcome"], record["details"]["file"]) == ("db backup", "ok", dump)


def test_a_backup_is_never_written_through_a_symlink_nor_into_someone_elses_folder(env, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    result = env.fabula("db", "backup", ENV, "--to", str(tmp_path / "link"))
    assert result.returncode == 1 and "symlink" in result.stderr and "fix:" in result.stderr
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "x.dump").symlink_to(victim)
    result = env.fabula("db", "backup", ENV, "--to", str(tmp_path / "x.dump"))
    assert result.returncode == 1 and "symlink" in result.stderr
    assert victim.read_text() == "precious\n" and list(real.iterdir()) == []
    folder = env.state_dir / "backups" / env.project / ENV
    before = sorted(folder.iterdir())
    os.chown(folder, 65534, 65534)  # nobody's: it could read or swap the dumps
    try:
        result = env.fabula("db", "backup", ENV)
        assert result.returncode == 1 and "belongs to uid 65534" in result.stderr
    finally:
        os.chown(folder, 0, 0)
    assert sorted(folder.iterdir()) == before


def test_maintenance_manage_and_deploy_plan_hold_the_lock_and_are_recorded(env):
    for argv in (["maintenance", ENV, "on"], ["maintenance", ENV, "off"], ["manage", ENV, "--", "check"],
                 ["deploy", ENV, "--plan"]):
        result = env.fabula(*argv)
        assert result.returncode == 0, f"{argv}: {result.stderr}"
    failed = env.fabula("manage", ENV, "--", "no-such-command")
    assert failed.returncode != 0
    actions = [(r["action"], r["outcome"]) for r in history(env)[-6:]]
    assert actions == [("maintenance on", "ok"), ("maintenance off", "ok"), ("manage", "ok"),
                       ("release build", "ok"), ("deploy plan", "ok"), ("manage", "failed")]
    assert not lock.lock_path(paths(env)).exists()


def test_destroy_is_refused_while_another_command_holds_the_lock_and_breaks_it_with_force(env):
    holder = lock.Holder.of_this_process("deploy", f"fabula deploy {ENV}")  # this test: a live command
    assert lock.create_exclusively(paths(env), holder)
    assert mode(lock.lock_path(paths(env))) == 0o600
    try:
        refused = env.fabula("destroy", ENV, "--yes")
        assert refused.returncode == 1, refused.stderr
        assert f"environment {ENV} is locked by {lock.owner()} (pid {os.getpid()}" in refused.stderr
        assert f"`fabula deploy {ENV}`" in refused.stderr
        assert f"`fabula destroy {ENV} --yes --force`" in refused.stderr
        assert [s["state"] for s in env.describe()["servers"]] == ["running"] * 4  # nothing touched
        for argv in (["maintenance", ENV, "on"], ["manage", ENV, "--", "check"], ["deploy", ENV, "--plan"],
                     ["db", "backup", ENV]):
            other = env.fabula(*argv)
            assert other.returncode == 1 and f"environment {ENV} is locked by" in other.stderr, argv
        forced = env.fabula("destroy", ENV, "--yes", "--force", timeout=300)
        assert forced.returncode == 0, forced.stderr
        assert "breaking the lock of environment" in forced.stderr
        assert leftovers(env) == []
        # the history outlives the environment: the broken lock and the destroy are its last records
        records = history(env)
        assert [(r["action"], r["outcome"]) for r in records[-2:]] == [("break lock", "ok"), ("destroy", "ok")]
        assert records[-2]["details"]["broken"]["pid"] == os.getpid()
    finally:
        lock.remove_if(paths(env), holder.id)
    assert not paths(env).env_dir.exists()
