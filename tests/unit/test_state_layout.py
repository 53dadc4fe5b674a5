"""Where an environment's files live: one directory per (project, environment), never shared, and
a directory holding another environment's state refused rather than used (or destroyed)."""
from __future__ import annotations

import json

import pytest

from fabula.errors import ConfigError, ExitStatus
from fabula.state import EnvPaths, EnvState, state_files
from tests.helpers import run_fabula
from tests.unit.test_config import VALID


def test_environments_whose_names_join_alike_get_different_directories(tmp_path):
    a, b = EnvPaths(tmp_path, "shop", "eu-prod"), EnvPaths(tmp_path, "shop-eu", "prod")
    assert a.env_dir == tmp_path / "shop" / "eu-prod"
    assert b.env_dir == tmp_path / "shop-eu" / "prod"
    assert a.env_dir != b.env_dir
    assert a.secrets_dir != b.secrets_dir and a.history_file != b.history_file
    assert a.backups_dir == tmp_path / "backups" / "shop" / "eu-prod"
    assert a.backups_dir != b.backups_dir
    # the kernel objects' tag stays a function of (project, env) only: not of the state root
    assert a.tag != b.tag
    assert a.tag == EnvPaths(tmp_path / "elsewhere", "shop", "eu-prod").tag


def test_the_history_is_beside_the_directory_so_that_it_outlives_it(tmp_path):
    paths = EnvPaths(tmp_path, "shop", "eu")
    assert paths.history_file.parent == paths.env_dir.parent
    assert not paths.history_file.is_relative_to(paths.env_dir)
    assert paths.history_file.name == "eu.history.jsonl"  # env names have no dots: never a directory's


def test_names_that_would_share_the_state_roots_own_folders_are_refused(tmp_path):
    for project in ("cache", "backups"):
        with pytest.raises(ConfigError) as refused:
            EnvPaths(tmp_path, project, "prod")
        assert "reserved" in str(refused.value) and refused.value.hint
        assert refused.value.exit_status == ExitStatus.BAD_INPUT
    for env in ("..", ".", "a/b", ""):
        with pytest.raises(ConfigError):
            EnvPaths(tmp_path, "shop", env)


def test_a_state_file_naming_another_environment_is_refused(tmp_path):
    theirs = EnvPaths(tmp_path, "shop", "prod")
    EnvState(project="shop-eu", env="prod").save(theirs)  # e.g. a directory copied or moved by hand
    with pytest.raises(ConfigError) as refused:
        EnvState.load(theirs)
    message = str(refused.value)
    assert f"{theirs.state_file} is the state of environment 'prod' of project 'shop-eu'" in message
    assert "fix:" in message and refused.value.exit_status == ExitStatus.BAD_INPUT
    mine = EnvPaths(tmp_path, "shop", "eu")
    EnvState(project="shop", env="prod").save(mine)
    with pytest.raises(ConfigError):
        EnvState.load(mine)
    EnvState(project="shop", env="eu").save(mine)
    assert EnvState.load(mine).env == "eu"


def test_the_cli_refuses_another_environments_directory_with_exit_status_2(tmp_path):
    (tmp_path / "fabula.yml").write_text(VALID)
    paths = EnvPaths(tmp_path / "state", "polls", "testing")
    EnvState(project="polls", env="staging").save(paths)
    for argv in (["describe", "testing"], ["destroy", "testing", "--yes"]):
        result = run_fabula(*argv, cwd=tmp_path, state_dir=tmp_path / "state")
        assert result.returncode == 2, result.stderr
        assert "is the state of environment 'staging' of project 'polls'" in result.stderr
        assert "fix:" in result.stderr
    assert paths.state_file.exists()  # destroy removed nothing


def test_an_environment_in_the_former_layout_is_not_silently_ignored(tmp_path):
    paths = EnvPaths(tmp_path, "shop", "prod")
    legacy = tmp_path / "shop-prod"
    legacy.mkdir()
    (legacy / "state.json").write_text(json.dumps({"project": "shop", "env": "prod"}))
    with pytest.raises(ConfigError) as refused:
        EnvState.load(paths)
    assert str(legacy) in str(refused.value) and f"mv {legacy} {paths.env_dir}" in refused.value.hint
    # another environment's former directory of that name is no concern of this one
    (legacy / "state.json").write_text(json.dumps({"project": "shop-prod", "env": "x"}))
    assert EnvState.load(paths) is None


def test_every_environments_state_file_is_found(tmp_path):
    for project, env in (("shop", "eu-prod"), ("shop-eu", "prod"), ("polls", "testing")):
        paths = EnvPaths(tmp_path, project, env)
        EnvState(project=project, env=env).save(paths)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in state_files(tmp_path)) == [
        "polls/testing/state.json", "shop-eu/prod/state.json", "shop/eu-prod/state.json"]


def test_the_environment_directory_is_made_traversable_whatever_the_umask(tmp_path):
    import os
    old = os.umask(0o077)
    try:
        paths = EnvPaths(tmp_path / "root", "shop", "eu")
        paths.make_env_dir()
    finally:
        os.umask(old)
    for folder in (paths.root, paths.project_dir, paths.env_dir):
        assert folder.stat().st_mode & 0o777 == 0o755
