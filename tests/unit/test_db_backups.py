"""Backups kept on a host (`db.backups_host`, provider ssh): `fabula db backup` takes the dump on the
primary and publishes it on the backups host, `backups` lists that host's, `restore NAME` takes it
from there; a path of this machine (`--to`, a restore FILE, `db copy`) still means this machine.
Against fake hosts (fabula.testing), and the host's own scripts run for real on a folder here."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path, PurePosixPath

import pytest
from rich.console import Console

from fabula.config import load_config
from fabula.context import Context
from fabula.db.backup import backup, list_backups, restore
from fabula.db.backup_store import LIST, PREPARE, PUBLISH, HostFolder
from fabula.errors import FabulaError
from fabula.output import Output
from fabula.providers.base import FileState, Result
from fabula.roles.postgres import PG_BIN
from fabula.state import EnvPaths, EnvState
from fabula.testing import FakeHost, FakeProvider, MachineHost
from fabula.topology import plan_servers
from tests.unit.test_config import write
from tests.unit.test_config_ssh import SSH

DUMP = b"PGDMP\x01\x0e\x00 a fake custom-format dump of shop"
FOLDER = PurePosixPath("/srv/fabula/backups/shop/production")
WITH_HOST = SSH.replace("    lb: {https_port: 443", "    db: {backups_host: db2}\n    lb: {https_port: 443")


def make_context(tmp_path: Path, text: str = WITH_HOST) -> Context:
    config = load_config(write(tmp_path, text))
    env = config.environment("production")
    paths = EnvPaths(tmp_path / "state", "shop", "production")
    paths.env_dir.mkdir(parents=True)
    state = EnvState(project="shop", env="production")
    state.servers = plan_servers(env, state)
    state.release = "abcdef012345"
    provider = FakeProvider(state=state)
    for record in state.servers.values():
        provider.ensure_server(record.name, record.role)
    out = Output(quiet=True, console=Console(file=io.StringIO()), err_console=Console(file=io.StringIO(), width=400))
    ctx = Context(config=config, env_name="production", env=env, paths=paths, state=state, out=out,
                  provider=provider)
    primary_answers(ctx.host("db1"))
    return ctx


def primary_answers(primary) -> None:
    def pg_dump(argv: list[str]) -> Result:
        primary.write(PurePosixPath(argv[argv.index("-f") + 1]), DUMP, mode=0o600, owner=primary.accounts.db)
        return Result(0, "", "")
    primary.answer([str(PG_BIN / "pg_dump")], pg_dump)
    primary.answer([str(PG_BIN / "psql")], Result(0, "8192\n", ""))
    primary.answer([str(PG_BIN / "pg_restore"), "--list"], Result(0, ";     dbname: shop\n", ""))


def backups_host_answers(host: FakeHost) -> None:
    """The host's scripts as the fake sees them: a folder with room, link(2) refusing a taken name."""
    def mktemp(argv: list[str]) -> Result:
        work = PurePosixPath(argv[-1].replace("XXXXXX", "w0rk42"))
        host.dirs[work] = FileState(0o700, "root")
        return Result(0, f"{work}\n", "")

    def publish(argv: list[str]) -> Result:
        work, folder, name = PurePosixPath(argv[4]), PurePosixPath(argv[5]), argv[6]
        for source, target in ((work / "dump", folder / name), (work / "meta", folder / f"{name}.json")):
            if target in host.files:
                return Result(4, "", f"{target} exists already")
            host.files[target] = host.files[source]
        return Result(0, "", "")

    def listing(argv: list[str]) -> Result:
        folder = PurePosixPath(argv[4])
        return Result(0, "".join(f"{p.name}\t{len(f.data)}\n" for p, f in host.files.items()
                                 if p.parent == folder and p.suffix == ".dump"), "")

    host.answer(["sh", "-c", PREPARE], Result(0, f"{1 << 30}\n", ""))
    host.answer(["mktemp"], mktemp)
    host.answer(["sh", "-c", PUBLISH], publish)
    host.answer(["sh", "-c", LIST], listing)


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    ctx = make_context(tmp_path)
    backups_host_answers(ctx.host("db2"))
    return ctx


def test_a_backup_goes_to_the_backups_host_and_is_listed_from_it(ctx: Context):
    db2 = ctx.host("db2")
    assert isinstance(db2, FakeHost)
    where = backup(ctx)
    name = where.rsplit("/", 1)[1]
    assert where == f"db2:{FOLDER}/{name}" and name.startswith("shop-production-") and name.endswith(".dump")
    # the folder made or checked first, then a private folder in it, the dump pushed there and linked
    assert db2.ran("sh", "-c", PREPARE)[0].argv[4:] == [str(FOLDER), name]
    work = FOLDER / ".backup-w0rk42"
    assert db2.ran("mktemp")[0].argv == ["mktemp", "-d", "--", str(FOLDER / ".backup-XXXXXX")]
    published = db2.files[FOLDER / name]
    assert (published.data, published.mode, published.owner) == (DUMP, 0o600, "root")
    meta = json.loads(db2.text(FOLDER / f"{name}.json"))
    assert db2.files[FOLDER / f"{name}.json"].mode == 0o600
    assert (meta["size"], meta["database"], meta["release"]) == (len(DUMP), "shop", "abcdef012345")
    assert db2.ran("sh", "-c", PUBLISH)[0].argv[4:] == [str(work), str(FOLDER), name, hashlib.sha256(DUMP).hexdigest()]
    assert meta["sha256"] == hashlib.sha256(DUMP).hexdigest()
    assert ["rm", "-rf", "--", str(work)] in db2.commands   # the private folder goes in any case
    # pg_dump ran as the database's user; nothing of it stays on the primary's scratch
    dumped = ctx.host("db1").ran(str(PG_BIN / "pg_dump"))
    assert len(dumped) == 1 and dumped[0].user == ctx.host("db1").accounts.db
    assert all(c.user is None for c in db2.calls)   # fabula's own scripts, as root
    # nothing was kept on this machine
    assert not ctx.paths.backups_dir.exists()
    assert [p.name for p in ctx.paths.root.iterdir() if p.name.startswith(".backup-")] == []
    listed = list_backups(ctx)
    assert [(b["path"], b["name"], b["size"], b["sha256"]) for b in listed] == [
        (where, name, len(DUMP), meta["sha256"])]


def test_a_taken_name_on_the_host_is_refused_before_anything_is_dumped(ctx: Context):
    db2 = ctx.host("db2")
    assert isinstance(db2, FakeHost)
    db2.answers.insert(0, (["sh", "-c", PREPARE], Result(4, "", "exists already")))
    with pytest.raises(FabulaError, match="exists already; nothing was written"):
        backup(ctx)
    assert ctx.host("db1").ran(str(PG_BIN / "pg_dump")) == []


def test_a_name_taken_meanwhile_is_not_overwritten(ctx: Context):
    db2 = ctx.host("db2")
    assert isinstance(db2, FakeHost)
    db2.answers.insert(0, (["sh", "-c", PUBLISH], Result(4, "", f"{FOLDER}/x.dump exists already")))
    with pytest.raises(FabulaError, match="exists already; nothing was written"):
        backup(ctx)
    assert [p for p in db2.files if p.parent == FOLDER] == []
    assert ["rm", "-rf", "--", str(FOLDER / ".backup-w0rk42")] in db2.commands


def test_to_is_still_a_path_of_this_machine(ctx: Context, tmp_path: Path):
    target = tmp_path / "here" / "copy.dump"
    assert backup(ctx, to=target) == str(target)
    assert target.read_bytes() == DUMP and (target.stat().st_mode & 0o777) == 0o600
    assert ctx.host("db2").commands == []


def test_restore_takes_a_listed_name_from_the_backups_host(ctx: Context):
    where = backup(ctx)
    name = where.rsplit("/", 1)[1]
    for given in (name, where):   # the bare name, or the path as listed
        db1 = ctx.host("db1")
        assert isinstance(db1, FakeHost)
        db1.calls.clear()
        kept = restore(ctx, given)
        assert kept.startswith("shop_before_restore_")
        pushed = [p for p in db1.files if p.name.startswith("restore-")]
        assert pushed and all(db1.files[p].data == DUMP and db1.files[p].owner == db1.accounts.db for p in pushed)
        restored = db1.ran(str(PG_BIN / "pg_restore"), "-h")
        assert len(restored) == 1 and restored[0].user == db1.accounts.db
    # the fetched copies went with the restores
    assert [p.name for p in ctx.paths.root.iterdir() if p.name.startswith(".restore-")] == []


def test_restore_checks_the_checksum_recorded_on_the_host(ctx: Context):
    where = backup(ctx)
    name = where.rsplit("/", 1)[1]
    db2 = ctx.host("db2")
    assert isinstance(db2, FakeHost)
    meta = json.loads(db2.text(FOLDER / f"{name}.json"))
    db2.write(FOLDER / f"{name}.json", json.dumps({**meta, "sha256": "0" * 64}).encode(), mode=0o600, owner="root")
    with pytest.raises(FabulaError, match=f"{name} does not match the checksum"):
        restore(ctx, name)
    assert ctx.host("db1").ran(str(PG_BIN / "pg_restore"), "-h") == []


def test_restore_of_a_name_the_host_does_not_have_or_that_is_no_name(ctx: Context):
    with pytest.raises(FabulaError, match="no backup shop-production-x.dump on db2") as missing:
        restore(ctx, "shop-production-x.dump")
    assert "fabula db backups" in str(missing.value)
    with pytest.raises(FabulaError, match="is not a backup's name"):
        restore(ctx, "..")
    assert ctx.host("db1").ran(str(PG_BIN / "pg_restore"), "-h") == []


def test_restore_of_a_file_of_this_machine_does_not_ask_the_backups_host(ctx: Context, tmp_path: Path):
    local = tmp_path / "mine.dump"
    local.write_bytes(DUMP)
    restore(ctx, str(local))
    assert ctx.host("db2").commands == []
    assert len(ctx.host("db1").ran(str(PG_BIN / "pg_restore"), "-h")) == 1


def test_db_backups_on_the_host_is_that_folder(tmp_path: Path):
    text = WITH_HOST.replace("db: {backups_host: db2}", "db: {backups_host: db2, backups: /var/backups/shop}")
    ctx = make_context(tmp_path, text)
    db2 = ctx.host("db2")
    assert isinstance(db2, FakeHost)
    backups_host_answers(db2)
    assert backup(ctx).startswith("db2:/var/backups/shop/shop-production-")


def test_without_a_backups_host_backups_stay_on_this_machine(tmp_path: Path):
    ctx = make_context(tmp_path, SSH)
    where = Path(backup(ctx))
    assert where.parent == ctx.paths.backups_dir and where.read_bytes() == DUMP
    assert [b["name"] for b in list_backups(ctx)] == [where.name]
    assert ctx.host("db2").commands == []


# -- the host's scripts, run for real on a folder of this machine --------------------------------




def meta_of(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.fixture
def shell_store(tmp_path: Path) -> HostFolder:
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    return HostFolder(MachineHost("db2", "db-replica", "10.0.0.42"), PurePosixPath(tmp_path / "a" / "backups"), scratch)


def test_the_folder_is_made_root_only_and_the_dump_published_whole_and_0600(shell_store: HostFolder):
    folder = Path(shell_store.folder)
    shell_store.prepare("x.dump", 1024)
    assert (folder.stat().st_mode & 0o777, folder.parent.stat().st_mode & 0o777) == (0o700, 0o700)
    partial = Path(shell_store.work_dir()) / "dump"
    partial.write_bytes(DUMP)
    assert shell_store.publish(partial, "x.dump", meta_of(DUMP)) == f"db2:{folder}/x.dump"
    assert (folder / "x.dump").read_bytes() == DUMP
    assert json.loads((folder / "x.dump.json").read_text())["sha256"] == meta_of(DUMP)["sha256"]
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {"x.dump": 0o600, "x.dump.json": 0o600}
    assert [(b["name"], b["size"]) for b in shell_store.list()] == [("x.dump", len(DUMP))]


def test_a_taken_name_is_refused_and_left_as_it_was(shell_store: HostFolder):
    folder = Path(shell_store.folder)
    shell_store.prepare("x.dump", 0)
    (folder / "x.dump").write_bytes(b"the older backup")
    with pytest.raises(FabulaError, match="exists already"):
        shell_store.prepare("x.dump", 0)
    # taken between prepare and publish: link(2) refuses it, nothing is replaced or left behind
    partial = Path(shell_store.work_dir()) / "dump"
    partial.write_bytes(DUMP)
    with pytest.raises(FabulaError, match="exists already"):
        shell_store.publish(partial, "x.dump", meta_of(DUMP))
    assert sorted(p.name for p in folder.iterdir()) == ["x.dump"]
    assert (folder / "x.dump").read_bytes() == b"the older backup"
    # a taken metadata name: the dump linked a moment before is taken back
    (folder / "y.dump.json").write_text("{}")
    with pytest.raises(FabulaError, match="y.dump.json exists already"):
        shell_store.publish(partial, "y.dump", meta_of(DUMP))
    assert sorted(p.name for p in folder.iterdir()) == ["x.dump", "y.dump.json"]


def test_a_folder_at_the_name_is_not_published_into(shell_store: HostFolder):
    folder = Path(shell_store.folder)
    shell_store.prepare("x.dump", 0)
    (folder / "x.dump").mkdir()
    partial = Path(shell_store.work_dir()) / "dump"
    partial.write_bytes(DUMP)
    with pytest.raises(FabulaError, match="exists already"):
        shell_store.publish(partial, "x.dump", meta_of(DUMP))
    assert list((folder / "x.dump").iterdir()) == []


def test_a_damaged_transfer_is_not_published(shell_store: HostFolder):
    shell_store.prepare("x.dump", 0)
    partial = Path(shell_store.work_dir()) / "dump"
    partial.write_bytes(DUMP)
    with pytest.raises(FabulaError, match="broken transfer"):
        shell_store.publish(partial, "x.dump", meta_of(b"something else"))
    assert list(Path(shell_store.folder).iterdir()) == []


def test_a_symlink_or_a_folder_of_another_user_is_refused(shell_store: HostFolder, tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = Path(shell_store.folder)
    folder.parent.mkdir(mode=0o700)
    folder.symlink_to(elsewhere)
    with pytest.raises(FabulaError, match="is a symlink"):
        shell_store.prepare("x.dump", 0)
    folder.unlink()
    folder.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(folder, 65534, 65534)
        with pytest.raises(FabulaError, match="belongs to uid 65534"):
            shell_store.prepare("x.dump", 0)
        os.chown(folder, 0, 0)
    folder.parent.chmod(0o777)
    with pytest.raises(FabulaError, match="must be root's and writable by no one else"):
        shell_store.prepare("x.dump", 0)


def test_too_little_space_on_the_host_is_refused(shell_store: HostFolder):
    with pytest.raises(FabulaError, match="not enough space"):
        shell_store.prepare("x.dump", 1 << 62)


def test_db_copy_passes_the_dump_through_a_file_of_this_machine(tmp_path: Path, monkeypatch):
    from fabula.db import copy
    for side in ("source", "target"):
        (tmp_path / side).mkdir()
    source, target = make_context(tmp_path / "source"), make_context(tmp_path / "target")
    target.env_name = "staging"   # another environment, with its own backups host
    target.paths = EnvPaths(tmp_path / "target" / "state", "shop", "staging")
    target.paths.env_dir.mkdir(parents=True)
    migrated = []
    monkeypatch.setattr(copy, "migrate_target", lambda ctx: migrated.append(ctx.env_name))
    kept = copy.copy_database(source, target, force=True)
    assert kept.startswith("shop_before_restore_") and migrated == ["staging"]
    assert source.host("db2").commands == [] and target.host("db2").commands == []
    target_db1 = target.host("db1")
    assert isinstance(target_db1, FakeHost)
    assert [f.data for p, f in target_db1.files.items() if p.name.startswith("restore-")] == [DUMP]
