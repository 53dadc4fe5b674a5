"""`fabula db backup`, `backups`, `restore` and `copy`.

A backup is pg_dump's custom format of the app's database, taken on the primary: a consistent
snapshot (one transaction) that restores into this or any other environment, with its own
roles, and that `pg_restore --list` can check before anything is touched. A base backup would
copy the whole cluster (every database, the roles, the WAL) and restore only into a cluster
of the same shape, which is what `reset-replicas` does, not what a backup is for.

Restore never works in place: the backup is restored into a new database, and only when that
succeeded are the two swapped, under maintenance mode. The database it replaced is kept.

Where backups are kept (a folder of this machine, or of the backups host) is backup_store.py's.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path, PurePosixPath

from fabula.context import Context
from fabula.db.backup_store import SUFFIX, configured_store, fetched, store_for
from fabula.environment.audit import operation
from fabula.errors import FabulaError
from fabula.maintenance import set_maintenance
from fabula.roles import postgres


def db_scratch(host):
    """Where dumps pass through on the database server: the database user's own folder (a
    world-writable one would let anyone on the machine swap a dump under a restore)."""
    folder = host.path("tmp", "postgresql")
    host.make_dirs([host.path("tmp")])
    host.make_dirs([folder], mode=0o700, owner=host.accounts.db)
    return folder


def primary_host(ctx: Context):
    record = ctx.state.one("db-primary")
    if record is None or not ctx.provider.server_exists(record.name):
        raise FabulaError(f"{ctx.env_name} has no running primary", f"run `fabula create {ctx.env_name}`")
    return ctx.host(record.name)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def backup(ctx: Context, to: Path | None = None) -> str:
    """`fabula db backup`: an operation of its own (the lock, a history record). `to`: a folder or
    file of this machine instead of the environment's store (db.backups, db.backups_host). Returns
    where the backup is (a path, or HOST:PATH on the backups host)."""
    primary_host(ctx)  # nothing to back up: refused before anything is locked or recorded
    with operation(ctx, "db backup") as op:
        target = _backup(ctx, to)
        op.details.update(file=target)
    return target


def _backup(ctx: Context, to: Path | None) -> str:
    host = primary_host(ctx)
    db = ctx.database_name
    size = int(postgres.psql(host, f"SELECT pg_database_size('{db}')").stdout.strip())
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    store, name = store_for(ctx, Path(to) if to else None, f"{ctx.project}-{ctx.env_name}-{stamp}{SUFFIX}")
    store.prepare(name, size)  # a dump is smaller than the database: its size is the safe bound
    remote = db_scratch(host) / f"backup-{stamp}{SUFFIX}"
    ctx.out.step(host.name, f"pg_dump {db}")
    # fetched into a private folder (0700) of this machine: no one sees the file before it is
    # whole and 0600, and nothing at its name is followed
    work = store.work_dir()
    try:
        host.check([str(postgres.PG_BIN / "pg_dump"), "-h", str(postgres.socket_dir(host)), "-U", "postgres",
                    "-Fc", "-d", db, "-f", str(remote)], user=host.accounts.db, timeout=3600)
        partial = work / "dump"
        host.fetch_file(remote, partial)
        with open(partial, "rb") as fh:
            os.fsync(fh.fileno())
        size = partial.stat().st_size
        meta = {"project": ctx.project, "environment": ctx.env_name, "database": db,
                "created": stamp, "size": size, "sha256": _sha256(partial),
                "release": ctx.state.release, "format": "pg_dump custom (-Fc)"}
        target = store.publish(partial, name, meta)
    finally:
        host.run(["rm", "-f", str(remote)])
        shutil.rmtree(work, ignore_errors=True)
    ctx.out.step("backup", f"{target} ({size // 1024} KiB)")
    return target


def list_backups(ctx: Context) -> list[dict]:
    return configured_store(ctx).list()


def _check_archive(ctx: Context, host, remote: PurePosixPath, source: Path, shown: str, force: bool) -> None:
    listing = host.run([str(postgres.PG_BIN / "pg_restore"), "--list", str(remote)], user=host.accounts.db)
    if not listing.ok:
        raise FabulaError(f"{shown} is not a readable pg_dump archive ({listing.stderr.strip()}); "
                          "nothing was changed", "restore a file made by `fabula db backup`")
    dumped = next((line.split(":", 1)[1].strip() for line in listing.stdout.splitlines()
                   if line.startswith(";     dbname:")), None)
    if dumped != ctx.database_name and not force:
        raise FabulaError(f"{shown} is a backup of database {dumped!r}, not of {ctx.database_name!r} "
                          f"(another project?); nothing was changed",
                          "pass --force to restore it anyway")
    meta_path = source.with_name(source.name + ".json")
    if meta_path.exists() and json.loads(meta_path.read_text()).get("sha256") not in (None, _sha256(source)):
        raise FabulaError(f"{shown} does not match the checksum recorded when it was made (damaged?); "
                          "nothing was changed")


def restore(ctx: Context, source: Path | str, force: bool = False, migrate=None) -> str:
    """Restore `source` as the app's database; returns the name the replaced database is kept as.
    `source`: a backup file of this machine, or, where the environment keeps its backups on a host
    (db.backups_host), a backup's name as `fabula db backups` lists it (taken from that host)."""
    primary_host(ctx)  # refused before anything is fetched
    with fetched(ctx, str(source)) as local:
        return _restore(ctx, local, str(source), force, migrate)


def _restore(ctx: Context, source: Path, shown: str, force: bool, migrate) -> str:
    if not source.is_file():
        raise FabulaError(f"no backup file {shown}", f"`fabula db backups {ctx.env_name}` lists them")
    host = primary_host(ctx)
    db = ctx.database_name
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S")
    remote = db_scratch(host) / f"restore-{stamp}{SUFFIX}"
    host.push_file(source, remote, owner=host.accounts.db)
    staging, kept = f"{db}_restoring", f"{db}_before_restore_{stamp}"
    try:
        _check_archive(ctx, host, remote, source, shown, force)
        with operation(ctx, "db restore") as op:
            op.details.update(backup=shown, kept_as=kept)
            set_maintenance(ctx, True)
            try:
                with op.phase("restore into a new database"):
                    _restore_into(ctx, host, remote, source, shown, staging)
                with op.phase("swap"):
                    ctx.out.step(host.name, f"swapping {db} for the restored database (kept as {kept})")
                    postgres.psql(host, f"""
ALTER DATABASE {db} ALLOW_CONNECTIONS false;
SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE datname = '{db}' AND pid <> pg_backend_pid();
ALTER DATABASE {db} RENAME TO {kept};
ALTER DATABASE {staging} RENAME TO {db};
""")
                if migrate:
                    with op.phase("migrate"):
                        migrate()
            finally:
                set_maintenance(ctx, False)
    finally:
        host.run(["rm", "-f", str(remote)])
    return kept


def _restore_into(ctx: Context, host, remote: PurePosixPath, source: Path, shown: str, staging: str) -> None:
    ctx.out.step(host.name, f"restoring {source.name} into {staging}")
    postgres.psql(host, f"DROP DATABASE IF EXISTS {staging};\nCREATE DATABASE {staging} OWNER app;")
    restored = host.run([str(postgres.PG_BIN / "pg_restore"), "-h", str(postgres.socket_dir(host)),
                         "-U", "postgres", "--no-owner", "--role=app", "--exit-on-error", "-d", staging,
                         str(remote)], user=host.accounts.db, timeout=3600)
    if not restored.ok:
        postgres.psql(host, f"DROP DATABASE IF EXISTS {staging}")
        raise FabulaError(f"restoring {shown} failed, the database was left as it was:\n"
                          f"{restored.stderr.strip()[-1500:]}")
