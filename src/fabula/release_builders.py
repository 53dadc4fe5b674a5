"""Where a release's build runs: on this machine, or on one of the environment's hosts when the
app's servers run another system than this machine (a virtualenv holds compiled wheels and the
interpreter's path: built here, it would not run there).

Both run every step as the environment's app user, never as root (the app's requirements' build
backends and its settings are the app's code), and leave the built tree (code, venv, static) in
the same folder of this machine, which release.py finishes and ships to the servers. Each
step's output goes to the build's log on this machine."""
from __future__ import annotations

import abc
import importlib.metadata
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO

from fabula.errors import FabulaError
from fabula.program_home import uv_binary
from fabula.providers.base import Host

STEP_TIMEOUT = 1800   # seconds: the requirements' installation on a slow host with a cold cache
# the last lines of the log an error shows
TAIL = 12
# a file of the built code, resolved (a committed symlink must not lead the build out of the code)
INSIDE_CODE = ('c=$(realpath -e -- "$1") && f=$(realpath -e -- "$2") && [ -f "$f" ] && '
               'case $f in "$c"/*) exit 0;; esac; exit 1')


def as_user(user: str, argv: list[str]) -> list[str]:
    """argv run as `user` (with its groups), unable to gain privileges back (setuid programs)."""
    return ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--init-groups",
            "--no-new-privs", *argv]


class Builder(abc.ABC):
    """One build's steps in its folder, `work`, as `user`, with `env`; output to `log`."""

    work: PurePosixPath
    cache: PurePosixPath   # uv's wheel cache: the environment's own

    log: IO[str]   # opened by the caller once the build's environment is known

    def __init__(self, release_id: str, user: str, log_path: Path):
        self.release_id, self.user, self.log_path = release_id, user, log_path
        self.env: dict[str, str] = {}

    @property
    @abc.abstractmethod
    def uv(self) -> str:
        """uv's path where the build runs."""

    @abc.abstractmethod
    def prepare(self, group: str) -> None:
        """An empty `work`, `cache` made, uv there."""

    @abc.abstractmethod
    def put_code(self, archive: bytes) -> None:
        """The revision's files (a tar) unpacked in work/code."""

    @abc.abstractmethod
    def _run(self, argv: list[str]) -> int:
        """argv as the build's user, its output appended to the log; its exit status."""

    @abc.abstractmethod
    def bring_here(self, local: Path, local_user: str) -> None:
        """The built tree in `local` (this machine's build folder, made and owned by `local_user`)."""

    def cleanup(self) -> None:  # noqa: B027 - only a remote build leaves something behind
        """What the build left where it ran, but for the wheel cache."""

    def step(self, what: str, argv: list[str], run: Callable[[list[str]], int] | None = None) -> None:
        """argv by `run` (default: in the build's folder, as the build's user); a failure raises."""
        self.log.write(f"$ {' '.join(argv)}\n")
        self.log.flush()
        if (run or self._run)(argv) != 0:
            self.fail(what)

    def fail(self, what: str) -> None:
        self.log.flush()
        tail = "\n".join(self.log_path.read_text().splitlines()[-TAIL:])
        raise FabulaError(f"release {self.release_id}: {what} failed:\n{tail}", f"the whole log is {self.log_path}")

    def succeeds(self, argv: list[str]) -> bool:
        return self._run(argv) == 0

    def is_code_file(self, relative: str) -> bool:
        code = str(self.work / "code")
        return self.succeeds(["sh", "-c", INSIDE_CODE, "sh", code, f"{code}/{relative}"])


class ThisMachine(Builder):
    """The build on the machine fabula runs on, as the environment's app user of this machine."""

    def __init__(self, release_id: str, user: str, log_path: Path, work: Path, cache: Path):
        super().__init__(release_id, user, log_path)
        self.work, self.cache = PurePosixPath(work), PurePosixPath(cache)

    @property
    def uv(self) -> str:
        return uv_binary()

    def prepare(self, group: str) -> None:
        work, cache = Path(self.work), Path(self.cache)
        shutil.rmtree(work, ignore_errors=True)
        for path in (work, cache):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            shutil.chown(path, self.user, group)
        cache.parent.chmod(0o755)

    def put_code(self, archive: bytes) -> None:
        self.step("unpacking the code", ["mkdir", "-p", str(self.work / "code"), str(self.work / ".home")])
        self._unpack(archive, self.work / "code")

    def _unpack(self, source: bytes | Path, into: PurePosixPath) -> None:
        argv = ["tar", "-x", "--no-same-owner", "-C", str(into)]
        self.log.write(f"$ {' '.join(argv)}\n")
        self.log.flush()
        if isinstance(source, Path):
            with source.open("rb") as fh:
                code = self._call(argv, stdin=fh)
        else:
            code = self._call(argv, input=source)
        if code != 0:
            self.fail("unpacking")

    def _call(self, argv: list[str], **kwargs) -> int:
        return subprocess.run(as_user(self.user, argv), stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                              cwd=str(self.work), **kwargs).returncode

    def _run(self, argv: list[str]) -> int:
        return self._call(argv)

    def bring_here(self, local: Path, local_user: str) -> None:
        assert local == Path(self.work)   # built in place


class OnHost(Builder):
    """The build on one of the environment's hosts (the worker host), in its tree's `.build`
    folder, as the environment's app user there; root never acts inside that folder, whose entries
    the app user (and so the app's processes on that host) could turn into links. Files cross in a
    folder of root's (`tmp/build-<id>`), where the app user can write its one file but replace
    none. uv comes from the package index, at this fabula's pinned version, into a virtualenv of
    the host's own Python (a uv binary of this machine may be of another architecture) that root
    owns (`build-tools/uv`): no process of the app can change it."""

    def __init__(self, release_id: str, user: str, log_path: Path, host: Host):
        super().__init__(release_id, user, log_path)
        self.host = host
        self.base = host.path(".build")
        self.work, self.cache = self.base / release_id, self.base / "cache"
        self.tools = host.path("build-tools", "uv")
        self.crossing = host.path("tmp", f"build-{release_id}")

    @property
    def uv(self) -> str:
        return str(self.tools / "bin" / "uv")

    def prepare(self, group: str) -> None:
        self.host.make_dirs([self.base], mode=0o700, owner=self.user)
        self.host.check(["rm", "-rf", "--", str(self.crossing)])
        self.host.make_dirs([self.crossing])
        # run where the build's folder does not exist yet
        self.step("making the build's folders", ["sh", "-c", 'rm -rf -- "$1" && mkdir -p -m 700 -- "$1/code" '
                                                 '"$1/.home" "$2"', "sh", str(self.work), str(self.cache)],
                  run=self._call)
        version = importlib.metadata.version("uv")
        probe = self.host.run([self.uv, "--version"])
        if probe.ok and probe.stdout.split()[:2] == ["uv", version]:
            return
        self.host.make_dirs([self.tools.parent])
        self._as_root("making uv's virtualenv (python3-venv)", ["python3", "-m", "venv", "--clear", str(self.tools)])
        # a wheel only: nothing of it runs as it is installed
        self._as_root(f"installing uv {version} from the package index",
                      [str(self.tools / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                       "--only-binary", ":all:", f"uv=={version}"])

    def _as_root(self, what: str, argv: list[str]) -> None:
        """fabula's own tool installed as root: with the proxies and the index of this machine's
        environment only (none of the app's values)."""
        env = {k: v for k, v in self.env.items() if k.lower() in ("http_proxy", "https_proxy", "no_proxy")}
        index = self.env.get("UV_INDEX_URL") or self.env.get("UV_DEFAULT_INDEX")
        if index:
            env["PIP_INDEX_URL"] = index
        self.log.write(f"$ {' '.join(argv)}\n")
        result = self.host.run(argv, env=env, timeout=STEP_TIMEOUT)
        self.log.write(result.stdout + result.stderr)
        if not result.ok:
            self.fail(what)

    def put_code(self, archive: bytes) -> None:
        with tempfile.NamedTemporaryFile(prefix="fabula-code-", suffix=".tar") as fh:
            fh.write(archive)
            fh.flush()
            self.host.push(Path(fh.name), self.crossing / "code.tar", mode=0o644, owner="root")
        self.step("unpacking the code", ["tar", "-x", "--no-same-owner", "-C", str(self.work / "code"),
                                         "-f", str(self.crossing / "code.tar")])

    def _run(self, argv: list[str]) -> int:
        # in the build's folder, as on this machine (relative paths in the requirements resolve alike)
        return self._call(["sh", "-c", 'cd -- "$1" && shift && exec "$@"', "sh", str(self.work), *argv])

    def _call(self, argv: list[str]) -> int:
        # the paths of this machine's certificates mean nothing there: uv trusts the host's own
        # store (ca-certificates, and whatever its admins added, e.g. a proxy's authority)
        env = {k: v for k, v in self.env.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
        env.setdefault("UV_NATIVE_TLS", "1")
        result = self.host.run(argv, user=self.user, env=env, timeout=STEP_TIMEOUT)
        self.log.write(result.stdout + result.stderr)
        self.log.flush()
        return result.returncode

    def bring_here(self, local: Path, local_user: str) -> None:
        packed = self.crossing / "built.tar"
        # made by root for the app user to fill: a file it may write, in a folder it may not change
        self.host.check(["install", "-o", self.user, "-m", "600", "/dev/null", str(packed)])
        self.step("packing the built release", ["tar", "-c", "-f", str(packed), "-C", str(self.work),
                                                "--exclude=./.home", "."])
        fd, name = tempfile.mkstemp(prefix=f".{self.release_id}-", suffix=".tar", dir=local.parent)
        os.close(fd)
        fetched = Path(name)
        try:
            self.host.fetch(packed, fetched)
            fetched.chmod(0o644)   # read by the unpacking below, which runs as the app user here
            unpack = ThisMachine(self.release_id, local_user, self.log_path, local, local)
            unpack.log, unpack.env = self.log, {"PATH": self.env.get("PATH", "/usr/bin:/bin")}
            unpack._unpack(fetched, PurePosixPath(local))
        finally:
            fetched.unlink(missing_ok=True)

    def cleanup(self) -> None:
        try:
            self.host.run(["rm", "-rf", "--", str(self.work)], user=self.user)
            self.host.run(["rm", "-rf", "--", str(self.crossing)])
        except FabulaError as exc:   # a leftover the next build removes: the build's own error matters more
            self.log.write(f"cleaning up on {self.host.name}: {exc}\n")
