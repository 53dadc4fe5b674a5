"""A release: one git revision of the app, built once (code, virtualenv from the requirements
with a shared wheel cache, collected static files) and used by every web and worker server."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path, PurePosixPath

from fabula import machine_users, secrets
from fabula.accounts import Accounts
from fabula.context import Context, Release
from fabula.errors import FabulaError
from fabula.program_home import PASSED_THROUGH
from fabula.providers.base import SYSTEM_PATH
from fabula.release_builders import Builder, OnHost, ThisMachine
from fabula.roles.appserver import app_variables
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


def build_environment(ctx: Context, work: PurePosixPath, release_id: str, cache: PurePosixPath) -> dict[str, str]:
    """The build's whole environment: the app's variables with the environment's real values (its
    settings are imported by collectstatic), uv's settings, and a fixed PATH."""
    # DATABASE_URL's socket folder is one of the build's own, where no PgBouncer listens: the build
    # has no database to connect to
    variables = app_variables(ctx, server="build", role="build", address="127.0.0.1",
                              static_root=str(work / "static"), release_id=release_id, home=str(work / ".home"),
                              app_user=Accounts(ctx.paths.tag).app, pgbouncer_dir=str(work / "run" / "pgbouncer"))
    passed = {k: os.environ[k] for k in PASSED_THROUGH if k in os.environ}
    # the system's certificate store, as the hosts' builds use theirs: where a proxy or a private
    # index has its own CA, it is there (uv's built-in roots would refuse it), and `sudo`, which
    # drops SSL_CERT_FILE, does not change what the build trusts
    passed.setdefault("UV_NATIVE_TLS", "1")
    return {**passed, **variables, "PATH": SYSTEM_PATH, "LANG": "C.UTF-8",
            "UV_CACHE_DIR": str(cache), "UV_NO_PROGRESS": "1", "UV_PYTHON_DOWNLOADS": "never"}


def wheel_cache(ctx: Context) -> Path:
    # the environment's own: a cache shared with another environment's builds (which run that
    # environment's requirements' build backends) could hand this one a poisoned wheel
    return ctx.paths.env_dir / "cache" / "uv"


def build_accounts(ctx: Context) -> Accounts:
    """The environment's users on this machine, where its releases are built (or unpacked, when
    a host builds them)."""
    accounts = Accounts(ctx.paths.tag)
    machine_users.ensure(accounts, f"fabula {ctx.paths.project}/{ctx.paths.env}", ctx.paths.root / ".accounts.lock")
    return accounts


def build(ctx: Context, rev: str = "HEAD") -> Release:
    """Build the release of `rev` once. Everything that runs the app's code or its requirements'
    (uv's build backends, collectstatic) runs as the environment's app user, never as root, on
    this machine or the host the provider names (release_builders); the finished release is
    root's, here, and read-only to the app."""
    commit, prefix = resolve(ctx, rev)
    release_id = commit[:12]
    final = ctx.paths.releases_dir / release_id
    if (final / METADATA).exists():
        ctx.out.step("release", f"{release_id} already built")
        return Release(release_id, commit, str(final))
    if ctx.secrets is None:
        ctx.secrets = secrets.load_or_create(ctx.paths)
    accounts = build_accounts(ctx)
    ctx.paths.releases_dir.mkdir(parents=True, exist_ok=True)
    work = ctx.paths.releases_dir / f".build-{release_id}"
    log_path = ctx.paths.releases_dir / f"{release_id}.build.log"
    place = ctx.provider.build_place()
    builder: Builder = (ThisMachine(release_id, accounts.app, log_path, work, wheel_cache(ctx))
                        if place.host is None else OnHost(release_id, accounts.app, log_path, place.host))
    # made before anything is: it fails without servers
    builder.env = build_environment(ctx, builder.work, release_id, builder.cache)
    started = time.monotonic()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as log:
        builder.log = log
        ctx.out.step("release", f"building {release_id} from {commit[:12]} on {place.why}")
        shutil.rmtree(work, ignore_errors=True)
        builder.prepare(accounts.group)
        try:
            _build_in(ctx, builder, commit, prefix)
            if place.host is not None:
                work.mkdir(mode=0o700)
                shutil.chown(work, accounts.app, accounts.group)
                builder.bring_here(work, accounts.app)
        finally:
            builder.cleanup()
    shutil.rmtree(work / ".home", ignore_errors=True)
    (work / "fabula").mkdir()
    shutil.copy(Path(runtime_init).parent / "fabula_wsgi.py", work / "fabula" / "fabula_wsgi.py")
    (work / METADATA).write_text(json.dumps({
        "id": release_id, "commit": commit, "built_at": time.time(),
        "build_seconds": round(time.monotonic() - started, 2),
        "built_on": "this machine" if place.host is None else place.host.name}))
    # immutable from now on: root's, readable by the environment's services, writable by none
    subprocess.run(["chown", "-R", "--no-dereference", "root:root", str(work)], check=True)
    subprocess.run(["chmod", "-R", "u+rwX,go+rX,go-w", str(work)], check=True)
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    ctx.out.step("release", f"{release_id} built in {time.monotonic() - started:.1f}s")
    return Release(release_id, commit, str(final))


def _build_in(ctx: Context, builder: Builder, commit: str, prefix: str) -> None:
    """The code, its virtualenv and its static files, in the builder's folder."""
    release_id = builder.release_id
    tree = f"{commit}:{prefix}" if prefix else commit
    toplevel = _git(ctx.config.source_dir, "rev-parse", "--show-toplevel")
    archive = subprocess.run(["git", "-C", toplevel, "archive", "--format=tar", tree], capture_output=True)
    if archive.returncode != 0:
        raise FabulaError(f"release {release_id}: git archive failed: {archive.stderr.decode().strip()}")
    builder.put_code(archive.stdout)
    app = ctx.config.project.app
    for name, relative in (("app.requirements", app.requirements), ("app.manage", app.manage)):
        if not builder.is_code_file(relative):
            raise FabulaError(f"release {release_id}: {name}: {relative} is not a file of the revision",
                              f"commit {relative} (a file, not a link out of the repository) or set {name} "
                              "in fabula.yml")
    uv, work = builder.uv, builder.work
    builder.step("creating the virtualenv", [uv, "venv", "--relocatable", "--python", app.python, str(work / "venv")])
    python = str(work / "venv" / "bin" / "python")
    # compiled to bytecode here, once: the release is read-only on the servers, where every
    # process would otherwise compile what it imports each time it starts (a Django and Celery
    # start took 1.6 s of CPU without, 0.55 s with)
    builder.step("installing the requirements", [uv, "pip", "install", "--compile-bytecode", "--python", python,
                                                 "-r", str(work / "code" / app.requirements)])
    if not builder.succeeds([python, "-c", "import gunicorn"]):
        builder.step("installing gunicorn", [uv, "pip", "install", "--compile-bytecode", "--python", python,
                                             "gunicorn==23.0.0"])
    # the app's own modules too; a file that does not compile (a template named .py, say) fails
    # only when something imports it, as it would have anyway
    builder.succeeds([python, "-m", "compileall", "-q", "-j", "0", str(work / "code")])
    if app.celery and not builder.succeeds([python, "-c", "import celery"]):
        raise FabulaError(f"release {release_id}: app.celery is set but celery is not in "
                          f"{app.requirements}", f"add celery to {app.requirements}")
    ctx.out.step("release", "collecting static files")
    builder.step("collectstatic", [python, str(work / "code" / app.manage), "collectstatic", "--noinput"])


def load(ctx: Context, release_id: str) -> Release | None:
    """A release built before, or None if it is not (or no longer) on disk."""
    meta = ctx.paths.releases_dir / release_id / METADATA
    if not meta.exists():
        return None
    return Release(release_id, json.loads(meta.read_text())["commit"], str(meta.parent))
