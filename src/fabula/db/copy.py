"""`fabula db copy SOURCE TARGET`: FabulAWS's reload_production_db. One environment's database
is backed up and restored into another (under maintenance), then the target's own migrations run."""
from __future__ import annotations

import tempfile
from pathlib import Path

from fabula import pki, secrets
from fabula.context import Context, Release
from fabula.db.backup import backup, restore
from fabula.environment.audit import operation
from fabula.errors import FabulaError
from fabula.roles import appserver

PRODUCTION_NAMES = ("production", "prod")


def is_production(ctx: Context) -> bool:
    return ctx.env.production or ctx.env_name in PRODUCTION_NAMES


def load_runtime(ctx: Context) -> None:
    """What running the app on a server needs: secrets, CA and the environment's release."""
    if not ctx.state.release:  # first: an environment not created is left without files
        raise FabulaError(f"{ctx.env_name} has no release yet", f"run `fabula create {ctx.env_name}`")
    ctx.secrets = secrets.load_or_create(ctx.paths)
    ctx.ca = pki.CertificateAuthority(ctx.paths)
    ctx.release = Release(ctx.state.release, "", str(ctx.paths.releases_dir / ctx.state.release))


def migrate_target(ctx: Context) -> None:
    record = (ctx.state.by_role("worker") or ctx.state.by_role("web"))[0]
    ctx.out.step(record.name, "running the target's migrations")
    appserver.run_manage(ctx, ctx.host(record.name), "migrate", "--noinput")


def copy_database(source: Context, target: Context, force: bool = False) -> str:
    if (source.project, source.env_name) == (target.project, target.env_name):
        raise FabulaError("source and target are the same environment")
    if is_production(target) and not force:
        raise FabulaError(f"{target.env_name} is a production environment: copying would replace its data",
                          "pass --force if that is really what you want")
    load_runtime(target)
    with operation(target, "db copy") as op, \
            tempfile.TemporaryDirectory(prefix="fabula-copy-", dir=source.paths.root) as tmp:
        op.details["source"] = source.env_name
        with op.phase("backup of the source"):
            dump = Path(tmp) / f"{source.env_name}.dump"
            backup(source, to=dump)   # a file of this machine, wherever the source keeps its backups
        return restore(target, dump, force=True, migrate=lambda: migrate_target(target))
