"""Where an environment's database backups are kept: a folder of this machine (`db.backups`, the
state root's backups folder, or `--to`), or a folder on one of the environment's hosts
(`db.backups_host`, provider ssh: `db.backups` on that host, default
/srv/fabula/backups/<project>/<env>, outside the environment's own tree so that it outlives
`destroy`, as the state root's backups do).

Either way a dump is published whole under its name, mode 0600 in a root-only folder, or not at
all: it is written under a private temporary name beside its final one and then given that name
by link(2), which refuses (rather than replaces or follows) whatever is there already. Its
metadata (`NAME.json`: sha256, size, release...) is published next to it the same way.
"""
from __future__ import annotations

import abc
import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from fabula.config.providers import HOST_TREE
from fabula.context import Context
from fabula.errors import FabulaError
from fabula.providers.base import Host

SUFFIX = ".dump"
DIR_MODE, FILE_MODE = 0o700, 0o600  # a dump holds every row of the app's data: root's only
# a backup's file name, as `fabula db backup` makes them (<project>-<env>-<stamp>.dump): no path
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}" + re.escape(SUFFIX), re.ASCII)


def require_space(free: int, size: int, where: str, fix: str) -> None:
    """Refuse a backup of a database of `size` bytes where `free` bytes are left (a dump is
    smaller than the database: its size is the safe bound)."""
    if free < size:
        raise FabulaError(f"not enough space for the backup {where}: {free // 2**20} MiB free, up to "
                          f"{size // 2**20} MiB needed (nothing was written)", fix)


class BackupStore(abc.ABC):
    """A folder of backups: `prepare` checks a new one can be made, `work_dir` is this machine's
    private folder the dump is fetched into, `publish` gives the finished dump its name."""

    @abc.abstractmethod
    def prepare(self, name: str, size: int) -> None:
        """Make or check the folder; refuse, before anything is dumped, a name (or its metadata)
        that exists, and a folder without `size` bytes free."""

    @abc.abstractmethod
    def work_dir(self) -> Path:
        """A new private (0700) folder of this machine for the dump in transit; the caller removes it."""

    @abc.abstractmethod
    def publish(self, partial: Path, name: str, meta: dict) -> str:
        """Publish the finished dump `partial` as `name` with its metadata; return where it is."""

    @abc.abstractmethod
    def list(self) -> list[dict]:
        """Each backup: `path` (where it is), `name`, `size`, and its metadata."""


# -- a folder of this machine ------------------------------------------------------------------

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


class LocalFolder(BackupStore):
    """A folder of this machine; `own`: fabula's backups folder (made 0700), not a --to folder."""

    def __init__(self, folder: Path, own: bool):
        self.folder, self.own = folder, own

    def prepare(self, name: str, size: int) -> None:
        target = self.folder / name
        private_dir(self.folder, own=self.own)
        if os.path.lexists(target) or os.path.lexists(target.with_name(target.name + ".json")):
            raise FabulaError(f"{target} exists already; nothing was written", "pass --to a new file's path")
        require_space(shutil.disk_usage(self.folder).free, size, f"in {self.folder}",
                      "free some space or pass --to PATH on another disk")

    def work_dir(self) -> Path:
        # beside the target (one filesystem, for link(2)), 0700: no one sees the file before it
        # is whole and 0600
        return Path(tempfile.mkdtemp(prefix=".backup-", dir=self.folder))

    def publish(self, partial: Path, name: str, meta: dict) -> str:
        target = self.folder / name
        publish(partial, target)
        write_new(target.with_name(target.name + ".json"), json.dumps(meta, indent=2).encode())
        return str(target)

    def list(self) -> list[dict]:
        found = []
        for dump in sorted(self.folder.glob(f"*{SUFFIX}")) if self.folder.exists() else []:
            meta_path = dump.with_name(dump.name + ".json")
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            found.append({"path": str(dump), "name": dump.name, "size": dump.stat().st_size, **meta})
        return found


# -- a folder on a host ---------------------------------------------------------------------------

# $1 the folder, $2 a backup's name: the folder made (each missing level 0700) or checked (a real
# folder, root's, writable by no one else, nor any folder above it), its mode 0700; the name and its
# metadata must be free. Prints the KiB free in the folder.
PREPARE = r"""d=$1 n=$2 me=$(id -u)
fail() { echo "$1" >&2; exit 1; }
if [ -L "$d" ]; then fail "the backups folder $d is a symlink: fabula keeps dumps only in a real folder"; fi
(umask 077 && mkdir -p -- "$d") || exit 1
if [ -L "$d" ] || [ ! -d "$d" ]; then fail "$d is not a folder"; fi
o=$(stat -c %u -- "$d")
[ "$o" = "$me" ] || fail "the backups folder $d belongs to uid $o, not to root: its owner could read or swap the dumps"
chmod 0700 -- "$d"
a=$(realpath -e -- "$d") || exit 1
while [ "$a" != / ]; do
  a=$(dirname -- "$a")
  o=$(stat -c %u -- "$a")
  if { [ "$o" != 0 ] && [ "$o" != "$me" ]; } || [ -n "$(find "$a" -maxdepth 0 -perm /022 ! -perm -1000)" ]; then
    fail "$a, a folder above the backups folder $d, must be root's and writable by no one else"
  fi
done
for f in "$d/$n" "$d/$n.json"; do
  if [ -e "$f" ] || [ -L "$f" ]; then echo "$f exists already" >&2; exit 4; fi
done
df -Pk -- "$d" | awk 'NR == 2 { print $4 }'
"""
EXISTS = 4
# $1 the private work folder (in the backups folder) holding `dump` and `meta`, $2 the folder, $3 the
# name, $4 the dump's sha256: checked, then each given its name by link(2) (`ln -T`: never into a
# folder at that name, never over a file), the dump first (and taken back if its metadata's name is
# taken); the work folder goes in any case.
PUBLISH = r"""w=$1 d=$2 n=$3
trap 'rm -rf -- "$w"' EXIT
publish() {
  e=$(ln -T -- "$1" "$2" 2>&1) && return 0
  if [ -e "$2" ] || [ -L "$2" ]; then echo "$2 exists already" >&2; return 4; fi
  echo "$e" >&2; return 1
}
s=$(sha256sum -- "$w/dump") || exit 1
if [ "${s%% *}" != "$4" ]; then
  echo "the copy on this host differs from the dump fetched (sha256): a broken transfer" >&2; exit 1
fi
chmod 0600 -- "$w/dump" "$w/meta" && sync -- "$w/dump" "$w/meta" || exit 1
publish "$w/dump" "$d/$n" || exit
publish "$w/meta" "$d/$n.json" || { c=$?; rm -f -- "$d/$n"; exit $c; }
"""
# $1 the folder: each backup's name and size, tab-separated (nothing when there is no folder)
LIST = r"""[ -d "$1" ] || exit 0
find "$1" -mindepth 1 -maxdepth 1 -type f -name '*.dump' -printf '%f\t%s\n'
"""


def host_folder(ctx: Context) -> PurePosixPath:
    """The folder of the environment's backups on its backups host."""
    configured = ctx.env.db.backups
    if configured:
        return PurePosixPath(configured)
    return HOST_TREE / "backups" / ctx.project / ctx.env_name


class HostFolder(BackupStore):
    """A folder on one of the environment's hosts (root's, 0700). The dump passes through this
    machine (a private temporary folder of the state root), as it does to a folder of this machine."""

    def __init__(self, host: Host, folder: PurePosixPath, scratch: Path):
        self.host, self.folder, self.scratch = host, folder, scratch

    def where(self, name: str) -> str:
        return f"{self.host.name}:{self.folder / name}"

    def prepare(self, name: str, size: int) -> None:
        result = self.host.run(["sh", "-c", PREPARE, "sh", str(self.folder), name])
        if result.returncode == EXISTS:
            raise FabulaError(f"{self.where(name)} exists already; nothing was written",
                              "run the backup again (its name has the time, to the second)")
        if not result.ok:
            raise FabulaError(f"{self.host.name}: {result.stderr.strip()[-500:]}; nothing was written",
                              "correct the folder on the host (root's, mode 0700), or db.backups in fabula.yml")
        kib = result.stdout.strip()
        require_space(int(kib) * 1024 if kib.isdigit() else 0, size, f"in {self.host.name}:{self.folder}",
                      "free some space on the host, or point db.backups at another disk of it")
        require_space(shutil.disk_usage(self.scratch).free, size,
                      f"on its way through this machine, in {self.scratch}",
                      "free some space here, or pass --to PATH on another disk (a folder of this machine)")

    def work_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=".backup-", dir=self.scratch))

    def publish(self, partial: Path, name: str, meta: dict) -> str:
        work = PurePosixPath(self.host.check(["mktemp", "-d", "--", str(self.folder / ".backup-XXXXXX")])
                             .stdout.strip())
        if work.parent != self.folder:
            raise FabulaError(f"{self.host.name}: mktemp made {work!s}, not a folder in {self.folder}")
        try:
            self.host.push_file(partial, work / "dump", mode=FILE_MODE, owner="root")
            self.host.write(work / "meta", json.dumps(meta, indent=2).encode(), mode=FILE_MODE, owner="root")
            result = self.host.run(["sh", "-c", PUBLISH, "sh", str(work), str(self.folder), name, meta["sha256"]],
                                   timeout=3600)
        finally:
            self.host.run(["rm", "-rf", "--", str(work)])
        if result.returncode == EXISTS:
            raise FabulaError(f"{self.host.name}: {result.stderr.strip()}; nothing was written",
                              "run the backup again (its name has the time, to the second)")
        if not result.ok:
            raise FabulaError(f"{self.host.name}: publishing the backup {name} failed: {result.stderr.strip()[-500:]}")
        return self.where(name)

    def list(self) -> list[dict]:
        found = []
        listing = self.host.check(["sh", "-c", LIST, "sh", str(self.folder)]).stdout
        for line in sorted(listing.splitlines()):
            name, _, size = line.partition("\t")
            if not NAME.fullmatch(name) or not size.isdigit():
                continue  # not a backup of fabula's
            raw = self.host.read_file(self.folder / f"{name}.json")
            meta = json.loads(raw) if raw else {}
            found.append({"path": self.where(name), "name": name, "size": int(size), **meta})
        return found

    def fetch(self, name: str, into: Path) -> Path:
        """Copy the backup `name` and its metadata (if any) into `into`, a private folder here."""
        if not NAME.fullmatch(name):
            raise FabulaError(f"{name!r} is not a backup's name (such as polls-production-20250101T000000Z.dump)",
                              "give a name as `fabula db backups` lists it, or a file's path (./NAME for one here)")
        if self.host.stat(self.folder / name) is None:
            raise FabulaError(f"no backup {name} on {self.host.name} (in {self.folder})",
                              "`fabula db backups ENV` lists them; a file of this machine is given by its path "
                              f"(./{name})")
        local = into / name
        self.host.fetch_file(self.folder / name, local)
        meta = self.host.read_file(self.folder / f"{name}.json")
        if meta is not None:
            write_new(into / f"{name}.json", meta)
        return local


# -- which store -----------------------------------------------------------------------------

def backups_host(ctx: Context) -> Host | None:
    """The host that keeps the environment's backups (db.backups_host), or None: this machine."""
    name = ctx.env.db.backups_host
    if name is None:
        return None
    if name not in ctx.state.servers:
        raise FabulaError(f"{ctx.env_name}'s backups host {name} (db.backups_host) is not one of its servers yet",
                          f"run `fabula create {ctx.env_name}`")
    return ctx.host(name)


def local_folder(ctx: Context) -> Path:
    configured = ctx.env.db.backups
    if configured:
        return configured if configured.is_absolute() else ctx.config.path.parent / configured
    return ctx.paths.backups_dir


def configured_store(ctx: Context) -> LocalFolder | HostFolder:
    """Where the environment keeps its backups: a folder on its backups host, or of this machine."""
    host = backups_host(ctx)
    if host is not None:
        return HostFolder(host, host_folder(ctx), ctx.paths.root)
    return LocalFolder(local_folder(ctx), own=True)


def store_for(ctx: Context, to: Path | None, name: str) -> tuple[BackupStore, str]:
    """Where a new backup goes, and its name: `--to` (a folder or file of this machine), else the
    environment's own store."""
    if to is None:
        return configured_store(ctx), name
    if to.is_symlink():
        raise FabulaError(f"{to} is a symlink: fabula writes database dumps only to a real path; "
                          "nothing was written", "pass --to the folder or file itself")
    if to.is_dir():
        return LocalFolder(to, own=False), name
    return LocalFolder(to.parent, own=False), to.name


@contextlib.contextmanager
def fetched(ctx: Context, source: str) -> Iterator[Path]:
    """The backup file `source` names, on this machine: with a backups host, a backup's name (as
    `fabula db backups` lists it, bare or as HOST:FOLDER/NAME) is fetched from it into a private
    temporary folder (removed afterwards); anything else is a path of this machine."""
    host = ctx.env.db.backups_host
    store = configured_store(ctx) if host and ("/" not in source or source.startswith(f"{host}:")) else None
    if isinstance(store, HostFolder):
        prefix = f"{store.host.name}:{store.folder}/"
        name = source.removeprefix(prefix)
        if "/" not in name:
            scratch = Path(tempfile.mkdtemp(prefix=".restore-", dir=store.scratch))
            try:
                ctx.out.step(store.host.name, f"fetching {name}")
                yield store.fetch(name, scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return
    yield Path(source)
