"""An environment's secrets: generated once, under a lock, so that concurrent first runs (two
`create`s, processes or threads) end with one set that all of them use; kept 0600 in a 0700
directory that is fabula's own."""
from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fabula import secrets
from fabula.errors import FabulaError
from fabula.state import EnvPaths


@pytest.fixture
def paths(tmp_path) -> EnvPaths:
    return EnvPaths(tmp_path / "state", "shop", "prod")


@pytest.fixture
def slow_generation(monkeypatch):
    """Generating takes a while, so that without the lock every concurrent first run would
    generate (and write) its own set."""
    token_hex, token_urlsafe = secrets._random.token_hex, secrets._random.token_urlsafe

    def slow(real):
        def generate(n):
            time.sleep(0.02)
            return real(n)
        return generate

    monkeypatch.setattr(secrets._random, "token_hex", slow(token_hex))
    monkeypatch.setattr(secrets._random, "token_urlsafe", slow(token_urlsafe))


def values(found: secrets.Secrets) -> tuple[str, ...]:
    return tuple(getattr(found, name) for name in secrets.NAMES)


def on_disk(paths: EnvPaths) -> tuple[str, ...]:
    stored = json.loads((paths.secrets_dir / secrets.FILE).read_text())
    return tuple(stored[name] for name in secrets.NAMES)


def first_run(root: str, start, results) -> None:
    start.wait()
    results.put(values(secrets.load_or_create(EnvPaths(Path(root), "shop", "prod"))))


def test_concurrent_first_runs_in_processes_end_with_one_set(paths, slow_generation):
    context = multiprocessing.get_context("fork")  # the children inherit the slow generation
    start, results = context.Barrier(6), context.Queue()
    workers = [context.Process(target=first_run, args=(str(paths.root), start, results)) for _ in range(6)]
    for worker in workers:
        worker.start()
    seen = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert len(set(seen)) == 1, "each process generated its own secrets"
    assert seen[0] == on_disk(paths)
    assert values(secrets.load_or_create(paths)) == seen[0]  # later runs read them, never regenerate


def test_concurrent_first_runs_in_threads_end_with_one_set(paths, slow_generation):
    start = threading.Barrier(8)

    def run(_):
        start.wait()
        return values(secrets.load_or_create(paths))

    with ThreadPoolExecutor(max_workers=8) as pool:
        seen = list(pool.map(run, range(8)))
    assert len(set(seen)) == 1 and seen[0] == on_disk(paths)


def test_a_missing_secret_is_added_and_the_others_kept(paths):
    first = secrets.load_or_create(paths)
    stored = json.loads((paths.secrets_dir / secrets.FILE).read_text())
    del stored["redis_password"]
    (paths.secrets_dir / secrets.FILE).write_text(json.dumps(stored))
    again = secrets.load_or_create(paths)
    assert again.db_app_password == first.db_app_password
    assert again.redis_password and again.redis_password != first.redis_password


def test_secrets_are_root_only_and_never_shown(paths):
    found = secrets.load_or_create(paths)
    assert paths.secrets_dir.stat().st_mode & 0o777 == 0o700
    assert (paths.secrets_dir / secrets.FILE).stat().st_mode & 0o777 == 0o600
    assert found.db_app_password not in repr(found)


def test_a_secrets_directory_that_is_a_symlink_is_refused(paths, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    paths.make_env_dir()
    paths.secrets_dir.symlink_to(elsewhere)
    with pytest.raises(FabulaError) as refused:
        secrets.load_or_create(paths)
    assert "symlink" in str(refused.value) and refused.value.hint
    assert list(elsewhere.iterdir()) == []


def test_a_secrets_file_that_is_a_symlink_is_not_followed(paths, tmp_path):
    secrets.load_or_create(paths)
    target = tmp_path / "not-secrets.json"
    target.write_text(json.dumps({name: "x" for name in secrets.NAMES}))
    (paths.secrets_dir / secrets.FILE).unlink()
    os.symlink(target, paths.secrets_dir / secrets.FILE)
    with pytest.raises(FabulaError):
        secrets.load_or_create(paths)
