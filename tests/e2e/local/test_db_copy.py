"""`fabula db copy`: one environment's database into another, then the target's own migrations."""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import uuid
from pathlib import Path

import httpx
import pytest

from tests.e2e.local.conftest import Environment, destroy_checked
from tests.helpers import SAMPLE_APP, commit_files, free_port, git, run_fabula

pytestmark = pytest.mark.e2e

SMALL = "{web: 1, worker: 1, cache: 1, db-primary: 1, db-replica: 0}"
MIGRATION = '''from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("notes", "0001_initial")]
    operations = [migrations.AddField("entry", "mood", models.CharField(max_length=20, null=True))]
'''


@pytest.fixture
def two_environments():
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests need root (network namespaces)")
    base = Path(tempfile.mkdtemp(prefix="fabula-e2e-", dir="/var/tmp"))
    base.chmod(0o755)
    project = f"copy-{secrets.token_hex(3)}"
    app = base / "app"
    shutil.copytree(SAMPLE_APP, app, ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3"))
    ports = {name: (free_port(), free_port()) for name in ("src", "dst")}
    (app / "fabula.yml").write_text(f"project: {project}\napp:\n  wsgi: polls.wsgi:application\n"
                                    "  settings: polls.settings\n  celery: polls.celery:app\nenvironments:\n" + "".join(
        f"  {name}:\n    servers: {SMALL}\n    lb: {{https_port: {https}, http_port: {http}}}\n"
        for name, (https, http) in ports.items()) + f"  production:\n    servers: {SMALL}\n")
    git(app, "init", "-q", "-b", "main")
    git(app, "add", "-A")
    git(app, "commit", "-q", "-m", "first")
    envs = {name: Environment(project, app, base / "state", https, http, name) for name, (https, http) in ports.items()}
    try:
        yield envs
    finally:
        try:
            for environment in envs.values():
                destroy_checked(environment)
        finally:
            shutil.rmtree(base, ignore_errors=True)


def entries(env: Environment) -> set[str]:
    return set(env.psql("db1", "SELECT text FROM notes_entry").split())


def test_copy_brings_the_source_rows_and_keeps_the_target_migrations(two_environments):
    src, dst = two_environments["src"], two_environments["dst"]
    assert run_fabula("create", "src", cwd=src.app_dir, state_dir=src.state_dir, timeout=900).returncode == 0
    texts = {f"src-{uuid.uuid4().hex[:8]}" for _ in range(5)}
    with httpx.Client(verify=False, timeout=10) as http:
        for text in texts:
            assert http.post(src.url + "/api/entries", data={"text": text}).status_code == 201
    # the target runs a newer revision, with a migration the source has not had
    commit_files(src.app_dir, "add mood", {"notes/migrations/0002_entry_mood.py": MIGRATION})
    created = run_fabula("create", "dst", cwd=dst.app_dir, state_dir=dst.state_dir, timeout=900)
    assert created.returncode == 0, created.stderr
    with httpx.Client(verify=False, timeout=10) as http:
        assert http.post(dst.url + "/api/entries", data={"text": "dst-only"}).status_code == 201

    refused = run_fabula("db", "copy", "src", "production", cwd=src.app_dir, state_dir=src.state_dir)
    assert refused.returncode == 1 and "production" in refused.stderr and "--force" in refused.stderr

    copied = run_fabula("db", "copy", "src", "dst", cwd=src.app_dir, state_dir=src.state_dir, timeout=600)
    assert copied.returncode == 0, copied.stderr
    assert entries(dst) == texts
    columns = dst.psql("db1", "SELECT column_name FROM information_schema.columns WHERE table_name = 'notes_entry'")
    assert "mood" in columns.split()
    with httpx.Client(verify=False, timeout=10) as http:
        assert http.get(dst.url + "/api/entries").json()["count"] == len(texts)
    # the source is untouched
    assert entries(src) == texts
