"""Deploys under load, as a user sees them through the load balancer: serial and full, a
revision that fails its health check, rollback with a long Celery task in flight, and the
strategy chosen from the migration plan."""
from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from fabula.sample import RequestLoad
from tests.helpers import commit_files, wait_for

pytestmark = pytest.mark.e2e

ADD_MOOD = '''from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("notes", "0001_initial")]
    operations = [migrations.AddField("entry", "mood", models.CharField(max_length=20, null=True))]
'''
DROP_MOOD = '''from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("notes", "0002_entry_mood")]
    operations = [migrations.RemoveField("entry", "mood")]
'''


def releases_served(environment, n: int = 20) -> set[str]:
    with httpx.Client(verify=False, timeout=10) as http:
        return {http.get(environment.url + "/api/info").json()["release"] for _ in range(n)}


def web_servers(environment) -> list[str]:
    return [s["name"] for s in environment.servers("web")]


def page_text(environment, marker: str) -> dict[str, str]:
    page = (environment.app_dir / "notes" / "templates" / "notes" / "index.html").read_text()
    return {"notes/templates/notes/index.html": page.replace("<h1>Polls on fabula", f"<h1>Polls on fabula {marker}", 1)}


def test_serial_deploy_under_load_drops_no_request(environment):
    env = environment
    before, old_servers = env.describe()["release"], web_servers(env)
    new = commit_files(env.app_dir, "v2", page_text(env, "v2"))[:12]
    with RequestLoad(env.url) as load:
        wait_for(lambda: len(load.outcomes) > 50, timeout=30, message="load running")
        result = env.fabula("deploy", env.name, "--serial", timeout=600)
        assert result.returncode == 0, result.stderr
    assert load.counts() == {"200": len(load.outcomes)}, load.counts()
    served = {release for _, _, release in load.outcomes}
    assert served == {before, new}  # old and new side by side, then only new
    assert releases_served(env) == {new}
    assert "v2" in httpx.get(env.url + "/", verify=False).text
    report = env.describe()
    now = web_servers(env)
    if report["autoscaling"]["fixed_inventory"]:
        # fixed hosts (ssh): each took the new release in place
        assert now == old_servers and {s["release"] for s in env.servers("web")} == {new}
    else:
        # every web server was replaced by one launched from the new release
        assert len(now) == len(old_servers) and not set(now) & set(old_servers)


def test_rollback_with_a_long_task_in_flight(environment):
    env = environment
    history = json.loads(env.fabula("history", env.name, "--json").stdout)
    previous = next(r["details"]["from_release"] for r in reversed(history) if r["action"] == "deploy")
    with httpx.Client(verify=False, timeout=10) as http:
        task = http.post(env.url + "/api/tasks", data={"text": "long", "seconds": "6"}).json()["task_id"]
    with RequestLoad(env.url) as load:
        result = env.fabula("rollback", env.name, timeout=600)
        assert result.returncode == 0, result.stderr
    assert load.counts() == {"200": len(load.outcomes)}, load.counts()
    assert releases_served(env) == {previous}
    with httpx.Client(verify=False, timeout=10) as http:
        wait_for(lambda: http.get(env.url + f"/api/tasks/{task}").json()["done"], timeout=60, message="task done")
    assert env.query(f"SELECT count(*) FROM notes_entry WHERE text = 'ran {task}'") == "1"


def test_a_revision_that_fails_its_health_check_leaves_the_old_one_serving(environment):
    env = environment
    before, servers = env.describe()["release"], web_servers(env)
    wsgi = (env.app_dir / "polls" / "wsgi.py").read_text()
    commit_files(env.app_dir, "broken", {"polls/wsgi.py": wsgi + "\nraise RuntimeError('broken on purpose')\n"})
    try:
        with RequestLoad(env.url) as load:
            result = env.fabula("deploy", env.name, "--serial", timeout=600)
        assert result.returncode == 1
        assert f"still serves release {before}" in result.stderr
        assert "RuntimeError: broken on purpose" in result.stderr  # the cause, from gunicorn's log
        assert load.counts() == {"200": len(load.outcomes)}, load.counts()
        assert releases_served(env) == {before}
        assert web_servers(env) == servers
    finally:  # the next tests deploy HEAD's parent: it must not be the broken revision
        commit_files(env.app_dir, "fixed", {"polls/wsgi.py": wsgi})


def test_deploy_chooses_serial_for_a_nullable_column_and_full_for_a_dropped_one(environment):
    env = environment
    add = commit_files(env.app_dir, "add mood", {"notes/migrations/0002_entry_mood.py": ADD_MOOD})
    plan = json.loads(env.fabula("deploy", env.name, "--plan", "--json", "--rev", add).stdout)
    assert plan["strategy"] == "serial" and plan["migrations"][0]["migration"] == "notes.0002_entry_mood"
    commit_files(env.app_dir, "drop mood", {"notes/migrations/0003_remove_entry_mood.py": DROP_MOOD})
    plan = json.loads(env.fabula("deploy", env.name, "--plan", "--json").stdout)
    assert plan["strategy"] == "full" and "notes.0003_remove_entry_mood" in plan["reason"]
    refused = env.fabula("deploy", env.name, "--serial")
    assert refused.returncode == 1 and "0003_remove_entry_mood" in refused.stderr and "--full" in refused.stderr
    assert env.query("SELECT count(*) FROM django_migrations WHERE name = '0002_entry_mood'") == "0"


def test_full_deploy_shows_the_upgrade_page_and_never_an_error(environment):
    env = environment
    add = subprocess.run(["git", "-C", str(env.app_dir), "rev-parse", "HEAD~1"], capture_output=True, text=True,
                         check=True).stdout.strip()
    with RequestLoad(env.url) as load:
        result = env.fabula("deploy", env.name, "--full", "--rev", add, timeout=600)
        assert result.returncode == 0, result.stderr
    counts = load.counts()
    assert set(counts) <= {"200", "503"} and counts.get("503", 0) > 0, counts
    assert releases_served(env) == {add[:12]}
    columns = env.query("SELECT column_name FROM information_schema.columns WHERE table_name = 'notes_entry'")
    assert "mood" in columns.split()
