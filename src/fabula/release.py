"""A release: one git revision of the app, built once (code, virtualenv from the requirements
with a shared wheel cache, collected static files) and used by every web and worker server."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

from fabula import machine_users, secrets
from fabula.accounts import Accounts
from fabula.context import Context, Release
from fabula.errors import FabulaError
from fabula.program_home import PASSED_THROUGH, uv_binary
from fabula.providers.base import SYSTEM_PATH
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




def build_environment(ctx: Context, work: Path, release_id: str) -> dict[str, str]:
    """The build's whole environment: the app's variables with the environment's real values (its
    settings are imported by collectstatic), uv's settings, and a fixed PATH."""
    # DATABASE_URL's socket folder is one of the build's own, where no PgBouncer listens: the build
    # has no database to connect to
    variables = app_variables(ctx, server="build", role="build", address="127.0.0.1",
                              static_root=str(work / "static"), release_id=release_id, home=str(work / ".home"),
                              app_user=Accounts(ctx.paths.tag).app, pgbouncer_dir=str(work / "run" / "pgbouncer"))
    passed = {k: os.environ[k] for k in PASSED_THROUGH if k in os.environ}
    return {**passed, **variables, "PATH": SYSTEM_PATH, "LANG": "C.UTF-8",
            "UV_CACHE_DIR": str(wheel_cache(ctx)), "UV_NO_PROGRESS": "1", "UV_PYTHON_DOWNLOADS": "never"}


def wheel_cache(ctx: Context) -> Path:
    # the environment's own: a cache shared with another environment's builds (which run that
    # environment's requirements' build backends) could hand this one a poisoned wheel
    return ctx.paths.env_dir / "cache" / "uv"


def as_user(user: str, argv: list[str]) -> list[str]:
    """argv run as `user` (with its groups), unable to gain privileges back (setuid programs)."""
    return ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--init-groups",
            "--no-new-privs", *argv]


def build_accounts(ctx: Context) -> Accounts:
    """The environment's users on this machine, where its releases are built."""
    accounts = Accounts(ctx.paths.tag)
    machine_users.ensure(accounts, f"fabula {ctx.paths.project}/{ctx.paths.env}", ctx.paths.root / ".accounts.lock")
    return accounts


def build(ctx: Context, rev: str = "HEAD") -> Release:
    """Build the release of `rev` once. Everything that runs the app's code or its requirements'
    (uv's build backends, collectstatic) runs as the environment's app user, never as root; the
    finished release is root's and read-only to the app."""
    commit, prefix = resolve(ctx, rev)
    release_id = commit[:12]
    final = ctx.paths.releases_dir / release_id
    if (final / METADATA).exists():
        ctx.out.step("release", f"{release_id} already built")
        return Release(release_id, commit, str(final))
    if ctx.secrets is None:
        ctx.secrets = secrets.load_or_create(ctx.paths)
    # built here, whatever the provider: as the environment's app user of this machine
    accounts = build_accounts(ctx)
    user = accounts.app
    ctx.paths.releases_dir.mkdir(parents=True, exist_ok=True)
    work = ctx.paths.releases_dir / f".build-{release_id}"
    log_path = ctx.paths.releases_dir / f"{release_id}.build.log"
    env = build_environment(ctx, work, release_id)  # fails before anything is made without servers
    shutil.rmtree(work, ignore_errors=True)
    for path in (work, wheel_cache(ctx)):
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.chown(path, user, accounts.group)
    for parent in (wheel_cache(ctx).parent,):
        parent.chmod(0o755)
    started = time.monotonic()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as log:
        def step(what: str, argv: list[str], **kwargs) -> None:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            proc = subprocess.run(as_user(user, argv), stdout=log, stderr=subprocess.STDOUT, env=env,
                                  cwd=str(work), **kwargs)
            if proc.returncode != 0:
                log.flush()
                tail = "\n".join(log_path.read_text().splitlines()[-12:])
                raise FabulaError(f"release {release_id}: {what} failed:\n{tail}",
                                  f"the whole log is {log_path}")

        def succeeds(argv: list[str]) -> bool:
            return subprocess.run(as_user(user, argv), env=env, cwd=str(work), capture_output=True).returncode == 0

        ctx.out.step("release", f"building {release_id} from {commit[:12]} on {ctx.provider.release_platform()}")
        tree = f"{commit}:{prefix}" if prefix else commit
        toplevel = _git(ctx.config.source_dir, "rev-parse", "--show-toplevel")
        archive = subprocess.run(["git", "-C", toplevel, "archive", "--format=tar", tree],
                                 capture_output=True)
        if archive.returncode != 0:
            raise FabulaError(f"release {release_id}: git archive failed: {archive.stderr.decode().strip()}")
        step("unpacking the code", ["mkdir", "-p", str(work / "code"), str(work / ".home")])
        step("unpacking the code", ["tar", "-x", "--no-same-owner", "-C", str(work / "code")], input=archive.stdout)
        app = ctx.config.project.app
        code = (work / "code").resolve()
        for name, relative in (("app.requirements", app.requirements), ("app.manage", app.manage)):
            # resolved: a committed symlink must not lead the build out of the release's code
            found = (code / relative).resolve()
            if not found.is_relative_to(code) or not found.is_file():
                raise FabulaError(f"release {release_id}: {name}: {relative} is not a file of the revision",
                                  f"commit {relative} (a file, not a link out of the repository) or set {name} "
                                  "in fabula.yml")
        uv = uv_binary()
        step("creating the virtualenv", [uv, "venv", "--relocatable", "--python", app.python, str(work / "venv")])
        python = str(work / "venv" / "bin" / "python")
        step("installing the requirements", [uv, "pip", "install", "--python", python,
                                             "-r", str(work / "code" / app.requirements)])
        if not succeeds([python, "-c", "import gunicorn"]):
            step("installing gunicorn", [uv, "pip", "install", "--python", python, "gunicorn==23.0.0"])
        if app.celery and not succeeds([python, "-c", "import celery"]):
            raise FabulaError(f"release {release_id}: app.celery is set but celery is not in "
                              f"{app.requirements}", f"add celery to {app.requirements}")
        ctx.out.step("release", "collecting static files")
        step("collectstatic", [python, str(work / "code" / app.manage), "collectstatic", "--noinput"])
    shutil.rmtree(work / ".home", ignore_errors=True)
    (work / "fabula").mkdir()
    shutil.copy(Path(runtime_init).parent / "fabula_wsgi.py", work / "fabula" / "fabula_wsgi.py")
    (work / METADATA).write_text(json.dumps({
        "id": release_id, "commit": commit, "built_at": time.time(),
        "build_seconds": round(time.monotonic() - started, 2)}))
    # immutable from now on: root's, readable by the environment's services, writable by none
    subprocess.run(["chown", "-R", "--no-dereference", "root:root", str(work)], check=True)
    subprocess.run(["chmod", "-R", "u+rwX,go+rX,go-w", str(work)], check=True)
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
