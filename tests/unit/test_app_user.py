"""No code of the app runs as root: the migration plan of `deploy --plan` and `fabula manage` run as
the environment's app user (and `fabula db psql` as its database user), and what a command on a
server gets as its environment is fabula's own, nothing of the operator's shell."""
from __future__ import annotations

import io
import json

from fabula.cli import main
from fabula.cli.runtime import CliEnvironment
from fabula.context import Context
from fabula.deploy import rollout
from fabula.providers.base import SYSTEM_PATH, Result
from fabula.providers.local.host import LocalHost
from tests.unit.test_roles import ctx  # noqa: F401 - the fixture: a context on fake hosts


def in_process(context: Context, monkeypatch, *argv: str) -> int:
    """`fabula ARGV` in this process, on `context` (its fake hosts, its release and secrets)."""
    import fabula.cli.db as db_cli
    import fabula.cli.deploy as deploy_cli

    for module in (deploy_cli, db_cli):
        monkeypatch.setattr(module, "open_env", lambda cli, config, env: context)
        monkeypatch.setattr(module, "load_runtime", lambda c: None)
    return main(list(argv), CliEnvironment(stdout=io.StringIO(), stderr=io.StringIO(), stdin_isatty=False, euid=0,
                                           state_root=context.paths.root))


def test_the_migration_plan_runs_the_releases_code_as_the_apps_user(ctx):  # noqa: F811
    host = rollout.migration_host(ctx)
    python = str(host.path("releases", ctx.release.id, "venv", "bin", "python"))
    plan = [{"migration": "notes.0002", "operations": []}]
    host.answer([python], Result(0, json.dumps(plan) + "\n", ""))
    assert rollout.migration_plan(ctx, ctx.release) == plan
    [call] = host.ran(python)
    assert call.user == host.accounts.app and call.user not in (None, "root"), call.user
    assert call.env is not None and call.env["PYTHONPATH"].endswith("/code")


def test_fabula_manage_runs_manage_py_as_the_apps_user(ctx, monkeypatch):  # noqa: F811
    host = rollout.migration_host(ctx)
    assert in_process(ctx, monkeypatch, "manage", "testing", "--", "showmigrations") == 0
    [call] = [c for c in host.calls if c.argv[-1] == "showmigrations"]
    assert call.argv[-2].endswith("/code/manage.py")
    assert call.user == host.accounts.app and call.user not in (None, "root"), call.user
    assert call.env is not None and call.env["DJANGO_SETTINGS_MODULE"] == "polls.settings"


def test_fabula_db_psql_runs_as_the_environments_database_user(ctx, monkeypatch):  # noqa: F811
    host = ctx.host(ctx.state.require("db-primary").name)
    assert in_process(ctx, monkeypatch, "db", "psql", "testing", "--", "-c", "SELECT 1") == 0
    [call] = [c for c in host.calls if c.argv[-2:] == ["-c", "SELECT 1"]]
    assert call.user == host.accounts.db and call.user not in (None, "root"), call.user


def test_a_local_command_gets_nothing_of_the_operators_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FABULA_TEST_MARKER", "from-the-operators-shell")
    monkeypatch.setenv("SUDO_USER", "operator")
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    host = LocalHost("worker1", "worker", "127.0.0.1", tmp_path, netns=None)
    for user in (None, "nobody"):
        env = host._env({"DJANGO_SETTINGS_MODULE": "polls.settings"}, user)
        assert "FABULA_TEST_MARKER" not in env and "SUDO_USER" not in env, env
        assert env["PATH"] == SYSTEM_PATH and env["DJANGO_SETTINGS_MODULE"] == "polls.settings"
    seen = host.run(["env"], user="nobody", env={"DJANGO_SETTINGS_MODULE": "polls.settings"})
    assert seen.ok, seen
    variables = dict(line.split("=", 1) for line in seen.stdout.splitlines())
    assert "FABULA_TEST_MARKER" not in variables and "SUDO_USER" not in variables, variables
    assert variables["PATH"] == SYSTEM_PATH
    assert set(variables) <= {"PATH", "LANG", "HOME", "DJANGO_SETTINGS_MODULE"}, variables

