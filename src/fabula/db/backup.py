"""`fabula db backup`, `backups`, `restore` and `copy`.

A backup is pg_dump's custom format of the app's database, taken on the primary: a consistent
snapshot (one transaction) that restores into this or any other environment, with its own
roles, and that `pg_restore --list` can check before anything is touched. A base backup would
copy the whole cluster (every database, the roles, the WAL) and restore only into a cluster
of the same shape, which is what `reset-replicas` does, not what a backup is for.

Restore never works in place: the backup is restored into a new database, and only when that
succeeded are the two swapped, under maintenance mode. The database it replaced is kept.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path, PurePosixPath

from fabula.context import Context
from fabula.environment.audit import operation
from fabula.errors import FabulaError
from fabula.maintenance import set_maintenance
from fabula.roles import postgres

SUFFIX = ".dump"
DIR_MODE, FILE_MODE = 0o700, 0o600  # a dump holds every row of the app's data: root's only


def db_scratch(host):
    """Where dumps pass through on the database server: the database user's own folder (a
    world-writable one would let anyone on the machine swap a dump under a restore)."""
    folder = host.path("tmp", "postgresql")
    host.make_dirs([host.path("tmp")])
    host.make_dirs([folder], mode=0o700, owner=host.accounts.db)
    return folder


def backup_dir(ctx: Context) -> Path:
    configured = ctx.env.db.backups
    if configured:
        return configured if configured.is_absolute() else ctx.config.path.parent / configured
    return ctx.paths.backups_dir


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


def private_dir(folder: Path, own: bool) -> None:
    """Make `folder` (each missing level 0700), or check the existing one: a directory, not a
    symlink (root would write wherever it points), owned by root (its owner could swap the
    files); `own` (fabula's backups folder, not a --to folder of the user's): mode 0700."""
    missing = []
    probe = folder
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for level in reversed(missing):
        try:
            os.mkdir(level, DIR_MODE)
        except FileExistsError:
            pass  # made meanwhile (a concurrent backup): checked below like any existing folder
    info = os.lstat(folder)
    if stat.S_ISLNK(info.st_mode):
        raise FabulaError(f"the backups folder {folder} is a symlink (to {os.readlink(folder)}): "
                          "fabula writes database dumps only into a real folder; nothing was written",
                          "point db.backups or --to at the folder itself")
    if not stat.S_ISDIR(info.st_mode):
        raise FabulaError(f"{folder} is not a folder; nothing was written", "pass --to a folder or a new file's path")
    if info.st_uid != os.geteuid():
        raise FabulaError(f"the backups folder {folder} belongs to uid {info.st_uid}, not to root: its owner "
                          "could read or swap the dumps; nothing was written",
                          f"`chown root: {folder}`, or choose another folder")
    if (own or folder in missing) and stat.S_IMODE(info.st_mode) != DIR_MODE:
        os.chmod(folder, DIR_MODE)


def publish(tmp: Path, target: Path) -> None:
    """Give the finished file `tmp` (in a private folder beside `target`) its name: link(2), which
    fails rather than replace or follow whatever is at `target` (like O_CREAT|O_EXCL|O_NOFOLLOW)."""
    os.chmod(tmp, FILE_MODE)
    try:
        os.link(tmp, target, follow_symlinks=False)
    except FileExistsError:
        raise FabulaError(f"{target} exists already; nothing was written", "pass --to a new file's path") from None


def write_new(path: Path, data: bytes) -> None:
    """Write a new file of mode 0600, refusing one that exists (a symlink included)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        os.close(fd)


def backup(ctx: Context, to: Path | None = None) -> Path:
    """`fabula db backup`: an operation of its own (the lock, a history record)."""
    primary_host(ctx)  # nothing to back up: refused before anything is locked or recorded
    with operation(ctx, "db backup") as op:
        target = _backup(ctx, to)
        op.details.update(file=str(target))
    return target


def _backup(ctx: Context, to: Path | None) -> Path:
    host = primary_host(ctx)
    db = ctx.database_name
    size = int(postgres.psql(host, f"SELECT pg_database_size('{db}')").stdout.strip())
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"{ctx.project}-{ctx.env_name}-{stamp}{SUFFIX}"
    to = Path(to) if to else None
    if to is not None and to.is_symlink():
        raise FabulaError(f"{to} is a symlink: fabula writes database dumps only to a real path; "
                          "nothing was written", "pass --to the folder or file itself")
    if to is None:
        target = backup_dir(ctx) / name
    elif to.is_dir():
        target = to / name
    else:
        target = to
    private_dir(target.parent, own=to is None)
    if os.path.lexists(target) or os.path.lexists(target.with_name(target.name + ".json")):
        raise FabulaError(f"{target} exists already; nothing was written", "pass --to a new file's path")
    free = shutil.disk_usage(target.parent).free
    if free < size:  # a dump is smaller than the database; the database's size is the safe bound
        raise FabulaError(f"not enough space for a backup of {db} in {target.parent}: "
                          f"{free // 2**20} MiB free, up to {size // 2**20} MiB needed (nothing was written)",
                          "free some space or pass --to PATH on another disk")
    remote = db_scratch(host) / f"backup-{stamp}{SUFFIX}"
    ctx.out.step(host.name, f"pg_dump {db}")
    # fetched into a folder of its own (0700, beside the target: one filesystem), so that no one
    # sees the file before it is whole and 0600, and nothing at its name is followed
    work = Path(tempfile.mkdtemp(prefix=".backup-", dir=target.parent))
    try:
        host.check([str(postgres.PG_BIN / "pg_dump"), "-h", str(postgres.socket_dir(host)), "-U", "postgres",
                    "-Fc", "-d", db, "-f", str(remote)], user=host.accounts.db, timeout=3600)
        partial = work / "dump"
        host.fetch_file(remote, partial)
        with open(partial, "rb") as fh:
            os.fsync(fh.fileno())
        publish(partial, target)
    finally:
        host.run(["rm", "-f", str(remote)])
        shutil.rmtree(work, ignore_errors=True)
    size = target.stat().st_size
    meta = {"project": ctx.project, "environment": ctx.env_name, "database": db,
            "created": stamp, "size": size, "sha256": _sha256(target),
            "release": ctx.state.release, "format": "pg_dump custom (-Fc)"}
    write_new(target.with_name(target.name + ".json"), json.dumps(meta, indent=2).encode())
    ctx.out.step("backup", f"{target} ({size // 1024} KiB)")
    return target


def list_backups(ctx: Context) -> list[dict]:
    found = []
    folder = backup_dir(ctx)
    for dump in sorted(folder.glob(f"*{SUFFIX}")) if folder.exists() else []:
        meta_path = dump.with_name(dump.name + ".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        found.append({"path": str(dump), "size": dump.stat().st_size, **meta})
    return found


def _check_archive(ctx: Context, host, remote: PurePosixPath, source: Path, force: bool) -> None:
    listing = host.run([str(postgres.PG_BIN / "pg_restore"), "--list", str(remote)], user=host.accounts.db)
    if not listing.ok:
        raise FabulaError(f"{source} is not a readable pg_dump archive ({listing.stderr.strip()}); "
                          "nothing was changed", "restore a file made by `fabula db backup`")
    dumped = next((line.split(":", 1)[1].strip() for line in listing.stdout.splitlines()
                   if line.startswith(";     dbname:")), None)
    if dumped != ctx.database_name and not force:
        raise FabulaError(f"{source} is a backup of database {dumped!r}, not of {ctx.database_name!r} "
                          f"(another project?); nothing was changed",
                          "pass --force to restore it anyway")
    meta_path = source.with_name(source.name + ".json")
    if meta_path.exists() and json.loads(meta_path.read_text()).get("sha256") not in (None, _sha256(source)):
        raise FabulaError(f"{source} does not match the checksum recorded when it was made (damaged?); "
                          "nothing was changed")


def restore(ctx: Context, source: Path, force: bool = False, migrate=None) -> str:
    """Restore `source` as the app's database; returns the name the replaced database is kept as."""
    source = Path(source)
    if not source.is_file():
        raise FabulaError(f"no backup file {source}", f"`fabula db backups {ctx.env_name}` lists them")
    host = primary_host(ctx)
    db = ctx.database_name
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S")
    remote = db_scratch(host) / f"restore-{stamp}{SUFFIX}"
    host.push_file(source, remote, owner=host.accounts.db)
    staging, kept = f"{db}_restoring", f"{db}_before_restore_{stamp}"
    try:
        _check_archive(ctx, host, remote, source, force)
        with operation(ctx, "db restore") as op:
            op.details.update(backup=str(source), kept_as=kept)
            set_maintenance(ctx, True)
            try:
                with op.phase("restore into a new database"):
                    _restore_into(ctx, host, remote, source, staging)
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


def _restore_into(ctx: Context, host, remote: PurePosixPath, source: Path, staging: str) -> None:
    ctx.out.step(host.name, f"restoring {source.name} into {staging}")
    postgres.psql(host, f"DROP DATABASE IF EXISTS {staging};\nCREATE DATABASE {staging} OWNER app;")
    restored = host.run([str(postgres.PG_BIN / "pg_restore"), "-h", str(postgres.socket_dir(host)),
                         "-U", "postgres", "--no-owner", "--role=app", "--exit-on-error", "-d", staging,
                         str(remote)], user=host.accounts.db, timeout=3600)
    if not restored.ok:
        postgres.psql(host, f"DROP DATABASE IF EXISTS {staging}")
        raise FabulaError(f"restoring {source} failed, the database was left as it was:\n"
                          f"{restored.stderr.strip()[-1500:]}")
