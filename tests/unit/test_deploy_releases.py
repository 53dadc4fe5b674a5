"""`fabula release ...` without building: which releases exist, which the group and each server
use, and a revision that is not there."""
from __future__ import annotations

import json
import subprocess

import pytest

from fabula.deploy.releases import BadRevision, build_release, releases_report
from fabula.errors import ExitStatus, FabulaError
from fabula.state import ServerRecord
from tests.helpers import run_fabula
from tests.unit.test_deploy_lock import make_context


@pytest.fixture
def ctx(tmp_path):
    return make_context(tmp_path)


def built(ctx, release_id: str, built_at: float) -> None:
    folder = ctx.paths.releases_dir / release_id
    folder.mkdir(parents=True)
    (folder / "release.json").write_text(json.dumps({
        "id": release_id, "commit": release_id + "0" * 28, "built_at": built_at, "build_seconds": 4.5}))


def test_the_list_says_which_release_the_group_and_each_server_uses(ctx):
    built(ctx, "bbbbbbbbbbbb", 2_000_000_000)
    built(ctx, "aaaaaaaaaaaa", 1_900_000_000)
    (ctx.paths.releases_dir / ".build-cccccccccccc").mkdir()  # a build in progress is no release yet
    ctx.state.release = "bbbbbbbbbbbb"
    ctx.state.servers = {
        "web1": ServerRecord("web1", "web", "10.0.0.5", release="bbbbbbbbbbbb"),
        "web2": ServerRecord("web2", "web", "10.0.0.6", release="aaaaaaaaaaaa"),
        "worker1": ServerRecord("worker1", "worker", "10.0.0.4", release="dddddddddddd"),
        "db1": ServerRecord("db1", "db-primary", "10.0.0.2")}
    report = releases_report(ctx)
    assert report["group_release"] == "bbbbbbbbbbbb"
    rows = [(r["id"], r["built"], r["group"], r["servers"]) for r in report["releases"]]
    assert rows == [("aaaaaaaaaaaa", True, False, ["web2"]),        # oldest first
                    ("bbbbbbbbbbbb", True, True, ["web1"]),
                    ("dddddddddddd", False, False, ["worker1"])]    # still run, though not on disk
    assert report["releases"][0]["build_seconds"] == 4.5
    assert report["releases"][0]["built_at"].startswith("2030-")


def git(source, *args: str) -> None:
    subprocess.run(["git", "-C", str(source), "-c", "user.email=t@fabula.invalid", "-c", "user.name=t", *args],
                   check=True, capture_output=True)


def test_a_revision_that_is_not_in_the_repository_is_named_and_nothing_is_built(ctx, tmp_path):
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "add", "fabula.yml")
    git(tmp_path, "commit", "-q", "-m", "config")
    with pytest.raises(BadRevision) as refused:
        build_release(ctx, "v9.9")
    assert refused.value.exit_status == ExitStatus.BAD_INPUT
    assert f"revision 'v9.9' is not a commit of {tmp_path}" in str(refused.value)
    assert "git -C" in refused.value.hint and "log --oneline" in refused.value.hint
    assert not ctx.paths.root.exists()


def test_a_source_that_is_not_a_git_repository_says_how_to_make_one(ctx, tmp_path):
    with pytest.raises(FabulaError) as refused:
        build_release(ctx, "HEAD")
    assert "git init" in refused.value.hint
    assert not ctx.paths.root.exists()


def test_the_list_of_an_environment_without_releases_says_how_to_build_one(tmp_path):
    make_context(tmp_path)
    result = run_fabula("release", "list", "testing", cwd=tmp_path, state_dir=tmp_path / "state")
    assert result.returncode == 0, result.stderr
    assert "no releases built for testing: `fabula release build testing` builds one" in result.stdout
