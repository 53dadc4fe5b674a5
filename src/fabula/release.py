"""A release: one git revision of the app, built once (code, virtualenv from the requirements
with a shared wheel cache, collected static files) and used by every web and worker server."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fabula.context import Context, Release
from fabula.errors import FabulaError
from fabula.runtime import __file__ as runtime_init

METADATA = "release.json"


def _git(source: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise FabulaError(f"app.source {source}: `git {' '.join(args)}` failed: {proc.stderr.strip()}",
                          "fabula deploys committed revisions: make app.source a git repository "
                          "(git init && git add -A && git commit)")
    return proc.stdout.strip()


def resolve(ctx: Context, rev: str = "HEAD") -> tuple[str, str]:
    """The commit of `rev` and the source folder's path inside its repository."""
    source = ctx.config.source_dir
    commit = _git(source, "rev-parse", "--verify", f"{rev}^{{commit}}")
    prefix = _git(source, "rev-parse", "--show-prefix").rstrip("/")
    return commit, prefix


def uv_binary() -> str:
    candidate = Path(sys.executable).parent / "uv"
    return str(candidate) if candidate.exists() else (shutil.which("uv") or "uv")


def build(ctx: Context, rev: str = "HEAD") -> Release:
    commit, prefix = resolve(ctx, rev)
    release_id = commit[:12]
    final = ctx.paths.releases_dir / release_id
    if (final / METADATA).exists():
        ctx.out.step("release", f"{release_id} already built")
        return Release(release_id, commit, str(final))
    ctx.paths.releases_dir.mkdir(parents=True, exist_ok=True)
    work = ctx.paths.releases_dir / f".build-{release_id}"
    log_path = ctx.paths.releases_dir / f"{release_id}.build.log"
    shutil.rmtree(work, ignore_errors=True)
    (work / "code").mkdir(parents=True)
    started = time.monotonic()
    with open(log_path, "w") as log:
        def step(what: str, argv: list[str], env: dict[str, str] | None = None, **kwargs) -> None:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, **kwargs)
            if proc.returncode != 0:
                log.flush()
                tail = "\n".join(log_path.read_text().splitlines()[-12:])
                raise FabulaError(f"release {release_id}: {what} failed:\n{tail}",
                                  f"the whole log is {log_path}")

        ctx.out.step("release", f"building {release_id} from {commit[:12]}")
        tree = f"{commit}:{prefix}" if prefix else commit
        toplevel = _git(ctx.config.source_dir, "rev-parse", "--show-toplevel")
        archive = subprocess.run(["git", "-C", toplevel, "archive", "--format=tar", tree],
                                 capture_output=True)
        if archive.returncode != 0:
            raise FabulaError(f"release {release_id}: git archive failed: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(work / "code")], input=archive.stdout, check=True)
        app = ctx.config.project.app
        for name, relative in (("app.requirements", app.requirements), ("app.manage", app.manage)):
            if not (work / "code" / relative).is_file():
                raise FabulaError(f"release {release_id}: {name}: {relative} is not in the revision",
                                  f"commit {relative} or set {name} in fabula.yml")
        uv_env = {**os.environ, "UV_CACHE_DIR": str(ctx.paths.wheel_cache), "UV_NO_PROGRESS": "1",
                  "UV_PYTHON_DOWNLOADS": "never"}
        uv = uv_binary()
        step("creating the virtualenv", [uv, "venv", "--relocatable", "--python", app.python,
                                         str(work / "venv")], env=uv_env)
        python = str(work / "venv" / "bin" / "python")
        step("installing the requirements", [uv, "pip", "install", "--python", python,
                                             "-r", str(work / "code" / app.requirements)], env=uv_env)
        if subprocess.run([python, "-c", "import gunicorn"], capture_output=True).returncode != 0:
            step("installing gunicorn", [uv, "pip", "install", "--python", python, "gunicorn==23.0.0"],
                 env=uv_env)
        if app.celery and subprocess.run([python, "-c", "import celery"], capture_output=True).returncode:
            raise FabulaError(f"release {release_id}: app.celery is set but celery is not in "
                              f"{app.requirements}", f"add celery to {app.requirements}")
        (work / "fabula").mkdir()
        shutil.copy(Path(runtime_init).parent / "fabula_wsgi.py", work / "fabula" / "fabula_wsgi.py")
        ctx.out.step("release", "collecting static files")
        step("collectstatic", [python, str(work / "code" / app.manage), "collectstatic", "--noinput"],
             env={"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8", "HOME": str(work),
                  "DJANGO_SETTINGS_MODULE": app.settings, "STATIC_ROOT": str(work / "static"),
                  "DJANGO_SECRET_KEY": secrets.token_hex(16), "FABULA_RELEASE": release_id,
                  "FABULA_ENVIRONMENT": ctx.env_name, "DJANGO_ALLOWED_HOSTS": "localhost"},
             cwd=str(work / "code"))
        (work / METADATA).write_text(json.dumps({
            "id": release_id, "commit": commit, "built_at": time.time(),
            "build_seconds": round(time.monotonic() - started, 2)}))
    subprocess.run(["chmod", "-R", "a+rX", str(work)], check=True)
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    ctx.out.step("release", f"{release_id} built in {time.monotonic() - started:.1f}s")
    return Release(release_id, commit, str(final))


def load(ctx: Context, release_id: str) -> Release | None:
    """A release built before, or None if it is not (or no longer) on disk."""
    meta = ctx.paths.releases_dir / release_id / METADATA
    if not meta.exists():
        return None
    return Release(release_id, json.loads(meta.read_text())["commit"], str(meta.parent))
