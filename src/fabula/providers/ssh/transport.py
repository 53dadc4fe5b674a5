"""The Host transport over SSH: one asyncssh connection per host, used synchronously.

fabula is synchronous; asyncssh is not. An SshPool (one per operation or program) runs one event
loop on a thread of its own and keeps one connection per host there; SshHost's methods submit a
coroutine to it and wait, so any number of threads can use any hosts at once.

Every command (also those behind the file methods) is one exec channel whose command line is
`exec [sudo -n] env -i PATH=... /bin/sh -c SNIPPET fabula-ssh N MARKER USER TIMEOUT DIR ARGV...`:
- the login shell only parses that line, so its kind barely matters (any POSIX-like shell);
- environment values are never in a command line (`ps` on the host shows them): SNIPPET reads the
  first N bytes of stdin (`dd bs=1`, which never reads past them, unlike `head -c` on a pipe), a
  block of `export NAME='value'` lines, evals it, then execs ARGV with the rest of stdin as its input;
- the block ends with a sentinel: if the connection dies before the whole block arrived, the
  command is not run, so a command whose start was lost can be retried without running twice;
- sshd runs commands through the login shell, and Debian's bash reads ~/.bashrc for them: whatever
  an rc file prints comes before MARKER, which SNIPPET prints on stdout and stderr just before the
  exec, and the client drops everything up to it;
- USER: `setpriv --reuid --regid --init-groups`; a non-root SSH user reaches root through `sudo -n`
  (passwordless sudo is a host requirement);
- TIMEOUT: `timeout --kill-after=2 T` on the host kills the command's whole process group, and the
  client gives up a few seconds later still (a hung host), closing the channel;
- `setpriv --pdeathsig=KILL`, as in the local provider: when sshd's session ends (fabula killed,
  the connection lost), the command ends too instead of racing the next run.

Files go through the same channel, not SFTP: sshd starts the sftp subsystem through the login
shell too, so one noisy rc file breaks the protocol; SFTP runs as the SSH user, so a sudo user
could not write root's files; and a file sent as stdin is faster (research: 10 MB in 0.09 s, SFTP
0.26 s). Writes are atomic (a temporary file beside, fsync, chown, chmod, rename)."""
from __future__ import annotations

import asyncio
import re
import secrets
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, Coroutine, Mapping
from contextlib import aclosing
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, TypeVar

import asyncssh

from fabula.accounts import Accounts
from fabula.errors import CommandFailed, FabulaError
from fabula.providers.base import SYSTEM_PATH, FileState, Host, Result

MAX_STARTS = 8         # handshakes in flight per pool: sshd's MaxStartups 10:30:100 drops more
MAX_CHANNELS = 10      # channels per connection: sshd's MaxSessions default
KEEPALIVE = 15         # seconds; 3 unanswered keepalives close a dead connection
KILL_AFTER = 2         # seconds between the host's TERM and KILL of a command that timed out
SESSION_WAIT = 30      # seconds a host may refuse channels (MaxSessions) before that is an error
CLIENT_GRACE = 5       # seconds the client waits beyond a timeout before it gives up on the host
CHUNK = 256 * 1024
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
ENV_DONE = "fabula_env_done"
MISSING = 3            # the exit status of the file scripts below when the file does not exist

# $1..$5: the env block's size in bytes (or the path of a file holding it), the marker, the user,
# the timeout, the directory; the rest is the command. Nothing after the eval reads a variable the
# block could have set, except the sentinel.
SNIPPET = f"""n=$1 m=$2 u=$3 t=$4 d=$5; shift 5
HOME=/root
if [ -n "$u" ]; then
  p=$(getent passwd "$u") || {{ echo "fabula: no user $u on this host" >&2; exit 125; }}
  g=${{p#*:*:*:}} h=${{p#*:*:*:*:*:}}
  HOME=${{h%%:*}}
  set -- setpriv --reuid="$u" --regid="${{g%%:*}}" --init-groups --pdeathsig=KILL -- "$@"
else
  set -- setpriv --pdeathsig=KILL -- "$@"
fi
[ -z "$t" ] || set -- setpriv --pdeathsig=KILL timeout --kill-after={KILL_AFTER} "$t" "$@"
export HOME
cd -- "$d" 2>/dev/null || cd /
unset OLDPWD PWD
case $n in
/*) e=$(cat -- "$n") && rm -f -- "$n" ;;
*) e=$(dd bs=1 count="$n" 2>/dev/null) ;;
esac
[ -z "$m" ] || {{ printf "%s\\n" "$m"; printf "%s\\n" "$m" >&2; }}
eval "$e"
[ "${{{ENV_DONE}-}}" = 1 ] || {{ echo "fabula: the environment did not arrive whole" >&2; exit 125; }}
unset {ENV_DONE}
exec "$@"
"""

# the file methods' scripts, run as root: $1 the path (then owner and mode)
READ = f'[ -e "$1" ] || exit {MISSING}; exec cat -- "$1"'
STAT = f'[ -e "$1" ] || exit {MISSING}; exec stat -L -c "%a %u %U" -- "$1"'
WRITE = """p=$1 d=${1%/*}; d=${d:-/}
mkdir -p -- "$d" && t=$(mktemp -- "$d/.${p##*/}.XXXXXX") || exit 1
trap 'rm -f -- "$t"' EXIT
cat >"$t" && sync -- "$t" && chown -- "$2:" "$t" && chmod -- "$3" "$t" && mv -f -- "$t" "$p"
"""
UNTAR = """p=$1 d=${1%/*}; d=${d:-/}
[ ! -e "$p" ] || { echo "$p already exists" >&2; exit 1; }
mkdir -p -- "$d" && t=$(mktemp -d -- "$p.partial.XXXXXX") || exit 1
trap 'rm -rf -- "$t"' EXIT
tar -xzf - --no-same-owner -C "$t" && mv -T -- "$t" "$p"
"""

T = TypeVar("T")


class SshUnreachable(FabulaError):
    """The host could not be reached, or the connection was lost while a command ran."""


# -- the command line: pure, tested without a network -------------------------------------------
def env_block(env: Mapping[str, str] | None) -> bytes:
    """The `export` lines SNIPPET evals: a fixed base, then `env`, then the sentinel."""
    lines = ["export LANG=C.UTF-8"]
    for name, value in (env or {}).items():
        if not ENV_NAME.match(name):
            raise ValueError(f"not an environment variable name: {name!r}")
        if "\0" in value:
            raise ValueError(f"the value of {name} has a NUL byte, which no environment can hold")
        lines.append(f"export {name}={shlex.quote(value)}")
    lines.append(f"{ENV_DONE}=1")
    return ("\n".join(lines) + "\n").encode()


def remote_command(argv: list[str], *, env_source: int | str, marker: str = "", user: str | None = None,
                   timeout: float | None = None, cwd: str = "/", sudo: bool = False) -> str:
    """The command line for sshd: `env_source` is the env block's size on stdin, or the path of a
    file on the host holding it (removed once read); `sudo` when the SSH user is not root."""
    if not argv:
        raise ValueError("no command")
    if any("\0" in arg for arg in argv):
        raise ValueError(f"an argument of {argv[0]!r} has a NUL byte")
    fixed = ["exec", *(["sudo", "-n"] if sudo else []), "env", "-i", f"PATH={SYSTEM_PATH}",
             "/bin/sh", "-c", SNIPPET, "fabula-ssh"]
    params = [str(env_source), marker, "" if user in (None, "root") else user,
              "" if timeout is None else f"{max(timeout, 0.001):.3f}".rstrip("0").rstrip("."), cwd]
    return shlex.join([*fixed, *params, *argv])


class Demarker:
    """Drops what comes before the marker line in a stream (what a login shell's rc file printed);
    a stream without the marker (the snippet stopped before it) is kept whole."""

    def __init__(self, marker: str):
        self.marker = (marker + "\n").encode()
        self.head: bytearray | None = bytearray()   # None once the marker has passed

    def feed(self, data: bytes) -> bytes:
        if self.head is None:
            return data
        self.head += data
        at = self.head.find(self.marker)
        if at < 0:
            return b""
        rest = bytes(self.head[at + len(self.marker):])
        self.head = None
        return rest

    def end(self) -> bytes:
        rest, self.head = bytes(self.head or b""), None
        return rest


# -- connections -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SshTarget:
    address: str
    port: int = 22
    user: str = "root"
    key: Path | None = None            # None: the ssh agent and ~/.ssh's default keys
    known_hosts: Path | None = None    # None: ~/.ssh/known_hosts; host keys are always verified
    jump: str | None = None            # [user@]host[:port], reached with this target's key and known_hosts

    def known_hosts_file(self) -> Path:
        return self.known_hosts or Path.home() / ".ssh" / "known_hosts"

    def jump_target(self) -> SshTarget | None:
        if not self.jump:
            return None
        user, _, hostport = self.jump.rpartition("@")
        host, _, port = hostport.partition(":")
        return replace(self, address=host, port=int(port or 22), user=user or self.user, jump=None)

    def known_hosts_name(self) -> str:
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"


def recorded_keys(known_hosts: Path, name: str) -> list[str]:
    """The keys ("ssh-ed25519 AAAA...") `known_hosts` records for `name` (a known_hosts name:
    "10.0.0.4" or "[10.0.0.4]:2222"), its hashed lines too."""
    if not known_hosts.is_file():
        return []
    found = subprocess.run(["ssh-keygen", "-F", name, "-f", str(known_hosts)], capture_output=True, text=True,
                           env={"PATH": SYSTEM_PATH})
    return [" ".join(line.split()[-2:]) for line in found.stdout.splitlines()
            if line.strip() and not line.startswith("#")]


def host_key_error(name: str, target: SshTarget) -> FabulaError:
    """An unknown key, or one that differs from the recorded one (asyncssh raises the same error
    for both; the difference matters to the user: a changed key may be an attack)."""
    path = target.known_hosts_file()
    where = f"{name} ({target.address} port {target.port})"
    recorded = path.is_file() and asyncssh.read_known_hosts(str(path)).match(
        target.address, target.address, target.port)[0]
    if recorded:
        return FabulaError(
            f"{where}: its host key differs from the one recorded in {path}; nothing was run "
            "(the server was reinstalled, or something is between you and it)",
            f"check the server's key (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on its console); "
            f"if it is right, `ssh-keygen -R '{target.known_hosts_name()}' -f {path}` and record the new one")
    return FabulaError(
        f"{where}: its host key is not in {path}; nothing was run",
        "record the hosts' keys with `fabula trust ENV` (it prints their fingerprints: compare them with the "
        f"hosts' own), or `ssh-keyscan -p {target.port} {target.address} >> {path}` after checking it")


class _Link:
    """One host's connection, made on first use and again after it was lost."""

    def __init__(self, target: SshTarget):
        self.target = target
        self.conn: asyncssh.SSHClientConnection | None = None
        self.lock = asyncio.Lock()
        self.channels = asyncio.Semaphore(MAX_CHANNELS)

    def drop(self, conn: asyncssh.SSHClientConnection) -> None:
        conn.close()
        if self.conn is conn:
            self.conn = None


class SshPool:
    """The event loop thread and the connections; close() (or `with`) when done."""

    def __init__(self, *, connect_timeout: float = 30):
        self.connect_timeout = connect_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fabula-ssh", daemon=True)
        self._thread.start()
        self._starts = asyncio.Semaphore(MAX_STARTS)
        self._links: dict[SshTarget, _Link] = {}

    def host(self, name: str, role: str, target: SshTarget, root: PurePosixPath,
             accounts: Accounts | None = None) -> SshHost:
        return SshHost(self, name, role, target, root, accounts)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("SshPool.call from its own event loop would wait forever")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self.call(self._close_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SshPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _close_all(self) -> None:
        conns = [link.conn for link in self._links.values() if link.conn]
        for conn in conns:
            conn.close()
        await asyncio.gather(*(conn.wait_closed() for conn in conns), return_exceptions=True)

    async def _connected(self, name: str, link: _Link) -> asyncssh.SSHClientConnection:
        async with link.lock:
            if link.conn is None or link.conn.is_closed():
                link.conn = await self._connect(name, link.target)
            return link.conn

    async def _connect(self, name: str, target: SshTarget) -> asyncssh.SSHClientConnection:
        jump = target.jump_target()
        # the jump host's connection first, outside the semaphore: holding a slot while waiting
        # for another could starve the pool
        tunnel = await self._connected(f"{name}'s jump host", self._links.setdefault(jump, _Link(jump))) if jump else ()
        if not target.known_hosts_file().is_file():
            raise host_key_error(name, target)
        async with self._starts:
            try:
                return await asyncssh.connect(
                    target.address, port=target.port, username=target.user, tunnel=tunnel,
                    client_keys=[str(target.key)] if target.key else (),
                    known_hosts=str(target.known_hosts_file()), connect_timeout=self.connect_timeout,
                    keepalive_interval=KEEPALIVE, keepalive_count_max=3)
            except asyncssh.HostKeyNotVerifiable:
                raise host_key_error(name, target) from None
            except (TimeoutError, OSError, asyncssh.Error) as exc:
                raise SshUnreachable(
                    f"{name} ({target.address} port {target.port}): cannot connect as {target.user}: "
                    f"{exc or type(exc).__name__}",
                    "check that the host is up, that sshd listens there and that the key is authorized") from None

    async def exec(self, host: SshHost, argv: list[str], *, user: str | None, env: Mapping[str, str] | None,
                   stdin: bytes | AsyncGenerator[bytes, None], timeout: float | None,
                   sink: BinaryIO | None = None) -> tuple[int, bytes, bytes]:
        """Run `argv` on the host: (exit status, stdout, stderr); stdout goes to `sink` if given."""
        block = env_block(env)
        marker = f"fabula-{secrets.token_hex(8)}"
        command = remote_command(argv, env_source=len(block), marker=marker, user=user, timeout=timeout,
                                 cwd=str(host.root), sudo=host.target.user != "root")
        link = self._links.setdefault(host.target, _Link(host.target))
        out, err = bytearray(), bytearray()
        proc: asyncssh.SSHClientProcess | None = None
        async with link.channels:   # waiting for a channel is not the command's time
            started = time.monotonic()
            try:
                # the client's deadline covers opening the channel too: a host that stopped
                # answering (frozen, unplugged) holds an exec request as long as a command
                async with asyncio.timeout(None if timeout is None else timeout + KILL_AFTER + CLIENT_GRACE):
                    proc = await self._start(host, link, argv, command)
                    await _communicate(proc, block, stdin, marker, sink or out, err)
            except BaseException as exc:
                if proc:   # also when the local tar failed: the host's command must not wait on
                    proc.close()
                if isinstance(exc, TimeoutError):   # the host's own `timeout` ends the command
                    return 124, bytes(out), bytes(err) + f"timed out after {timeout}s (no answer)\n".encode()
                if isinstance(exc, asyncssh.Error | OSError):
                    raise _lost(host, argv, exc) from None
                raise
        assert proc is not None
        if proc.returncode is None:    # the channel closed without an exit status
            raise _lost(host, argv, None)
        # 124: `timeout` sent TERM; KILL (KILL_AFTER later) reaches its own process group, `timeout`
        # included, hence -9 (or 137 through a shell)
        if timeout is not None and proc.returncode in (124, -9, 128 + 9) and time.monotonic() - started >= timeout:
            return 124, bytes(out), bytes(err) + f"timed out after {timeout}s\n".encode()
        return proc.returncode, bytes(out), bytes(err)

    async def hold(self, host: SshHost, argv: list[str], ready: str, timeout: float = 30) -> tuple[Held | None, str]:
        """Start `argv` (as root) and keep it running until the Held is closed: (Held, what it
        printed before) once it prints the line `ready`; (None, what it printed) if it ends first.
        The channel's end (close(), fabula killed, the connection lost) ends the command on the
        host too (its stdin closes, and setpriv's parent-death signal)."""
        block = env_block(None)
        marker = f"fabula-{secrets.token_hex(8)}"
        command = remote_command(argv, env_source=len(block), marker=marker, cwd="/",
                                 sudo=host.target.user != "root")
        link = self._links.setdefault(host.target, _Link(host.target))
        await link.channels.acquire()   # one channel of the host's, for as long as it is held
        try:
            async with asyncio.timeout(timeout):
                proc = await self._start(host, link, argv, command)
                proc.stdin.write(block)
                demarker, seen = Demarker(marker), b""
                while chunk := await proc.stdout.read(CHUNK):
                    seen += demarker.feed(chunk)
                    if ready.encode() + b"\n" in seen:
                        return Held(self, proc, link), seen.split(ready.encode() + b"\n")[0].decode(errors="replace")
                seen += demarker.end()
                await proc.wait_closed()
        except BaseException:
            link.channels.release()
            raise
        link.channels.release()
        return None, seen.decode(errors="replace")

    async def host_key(self, name: str, target: SshTarget) -> asyncssh.SSHKey:
        """The key the host presents (through the jump host, whose own key must be known)."""
        jump = target.jump_target()
        tunnel = await self._connected(f"{name}'s jump host", self._links.setdefault(jump, _Link(jump))) if jump else ()
        async with self._starts:
            try:
                key = await asyncssh.get_server_host_key(target.address, target.port, tunnel=tunnel)
            except (TimeoutError, OSError, asyncssh.Error) as exc:
                raise SshUnreachable(f"{name} ({target.address} port {target.port}): {exc or type(exc).__name__}",
                                     "check that the host is up and that sshd listens there") from None
        if key is None:
            raise SshUnreachable(f"{name} ({target.address}): it presented no host key")
        return key

    async def login_line(self, host: SshHost, command: str, timeout: float = 30) -> str:
        """The line `command` prints after a marker, run by the SSH user's login shell itself (for
        what only the login session knows, such as SSH_CLIENT); '' when it prints none."""
        marker = f"fabula-{secrets.token_hex(8)}"
        link = self._links.setdefault(host.target, _Link(host.target))
        async with link.channels, asyncio.timeout(timeout):
            conn = await self._connected(host.name, link)
            result = await conn.run(f"printf '%s ' {marker}; {command}", check=False, encoding="utf-8",
                                    errors="replace")
        text = result.stdout if isinstance(result.stdout, str) else ""
        return text.rpartition(marker + " ")[2].strip() if marker in text else ""

    async def _start(self, host: SshHost, link: _Link, argv: list[str], command: str) -> asyncssh.SSHClientProcess:
        """Open the channel and send the exec request; once more on a new connection if the
        connection was lost meanwhile: SNIPPET runs nothing before the env block's sentinel
        arrives, which is only sent once this returns, so a lost start cannot have run."""
        retried, refused_since = False, time.monotonic()
        while True:
            conn = await self._connected(host.name, link)
            try:
                return await conn.create_process(command, encoding=None)
            except (asyncssh.Error, OSError) as exc:
                if not conn.is_closed() and isinstance(exc, asyncssh.ChannelOpenError):
                    # refused on a live connection: sshd frees a closed channel's session a little
                    # after the client sees it closed (or the host allows fewer than MAX_CHANNELS),
                    # so MaxSessions refuses for a while; the command has not started
                    if time.monotonic() - refused_since > SESSION_WAIT:
                        raise SshUnreachable(f"{host.name} ({host.address}): cannot open a channel: {exc}",
                                             "check sshd's MaxSessions on the host (fabula uses up to "
                                             f"{MAX_CHANNELS})") from None
                    await asyncio.sleep(0.05)
                    continue
                if not (conn.is_closed() or isinstance(exc, asyncssh.DisconnectError | ConnectionError)):
                    raise SshUnreachable(f"{host.name} ({host.address}): cannot open a channel: {exc}") from None
                lost = exc
            link.drop(conn)
            if retried:
                raise _lost(host, argv, lost)
            retried = True


class Held:
    """A command SshPool.hold keeps running on a host (e.g. `flock` holding a lock)."""

    def __init__(self, pool: SshPool, proc: asyncssh.SSHClientProcess, link: _Link):
        self._pool, self._proc, self._link = pool, proc, link
        self._ticker: asyncio.Task | None = None

    def every(self, seconds: float, data: bytes) -> None:
        """Send `data` to the command's stdin every `seconds` (a heartbeat it waits for)."""
        async def tick() -> None:
            while True:
                await asyncio.sleep(seconds)
                self._proc.stdin.write(data)

        async def start() -> None:
            self._ticker = asyncio.get_running_loop().create_task(tick())

        self._pool.call(start())

    def close(self, last: bytes = b"") -> None:
        """End the command: `last` written to its stdin, then its end of input."""
        self._pool.call(self._close(last))

    async def _close(self, last: bytes) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        try:
            if last:
                self._proc.stdin.write(last)
            self._proc.stdin.write_eof()
            async with asyncio.timeout(10):
                await self._proc.wait_closed()
        except (TimeoutError, asyncssh.Error, OSError):
            self._proc.close()
        finally:
            self._link.channels.release()


def _lost(host: SshHost, argv: list[str], exc: BaseException | None) -> SshUnreachable:
    return SshUnreachable(
        f"{host.name} ({host.address}): the connection was lost while `{shlex.join(argv)[:200]}` ran"
        + (f" ({exc})" if exc else "") + "; it may or may not have completed",
        "check the host, then run the command again")


async def _communicate(proc: asyncssh.SSHClientProcess, block: bytes, stdin: bytes | AsyncGenerator[bytes, None],
                       marker: str, out: bytearray | BinaryIO, err: bytearray) -> None:
    async def feed() -> None:
        try:
            proc.stdin.write(block)
            if isinstance(stdin, bytes):
                proc.stdin.write(stdin)
            else:
                async with aclosing(stdin):
                    async for chunk in stdin:
                        proc.stdin.write(chunk)
                        await proc.stdin.drain()
            proc.stdin.write_eof()
        except (BrokenPipeError, ConnectionError, asyncssh.Error):
            pass   # the command ended without reading all its input (subprocess tolerates it too)

    async def pump(stream: asyncssh.SSHReader, into: bytearray | BinaryIO) -> None:
        write = into.extend if isinstance(into, bytearray) else into.write
        demarker = Demarker(marker)
        while chunk := await stream.read(CHUNK):
            write(demarker.feed(chunk))
        write(demarker.end())

    await asyncio.gather(feed(), pump(proc.stdout, out), pump(proc.stderr, err))
    await proc.wait_closed()


async def _file_chunks(path: Path) -> AsyncGenerator[bytes, None]:
    loop = asyncio.get_running_loop()
    with path.open("rb") as fh:
        while chunk := await loop.run_in_executor(None, fh.read, CHUNK):
            yield chunk


async def _tar_chunks(local: Path) -> AsyncGenerator[bytes, None]:
    """`local`'s tree as one gzip'd tar stream, made by tar on this machine as it is sent."""
    tar = await asyncio.create_subprocess_exec(
        "tar", "-cz", "-C", str(local), "--owner=0", "--group=0", "--numeric-owner", "-f", "-", ".",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert tar.stdout is not None and tar.stderr is not None
    try:
        while chunk := await tar.stdout.read(CHUNK):
            yield chunk
        if await tar.wait() != 0:
            raise FabulaError(f"tar of {local} failed: {(await tar.stderr.read()).decode(errors='replace')}")
    finally:
        if tar.returncode is None:
            tar.kill()
            await tar.wait()


# -- the Host ------------------------------------------------------------------------------------
class SshHost(Host):
    """A server reached over SSH, through its pool's connection."""

    def __init__(self, pool: SshPool, name: str, role: str, target: SshTarget, root: PurePosixPath,
                 accounts: Accounts | None = None):
        self.name, self.role, self.address = name, role, target.address
        self.target, self.root = target, PurePosixPath(root)
        self.accounts = accounts or Accounts("")
        self._pool = pool

    def _exec(self, argv: list[str], *, user: str | None = None, env: Mapping[str, str] | None = None,
              stdin: bytes | AsyncGenerator[bytes, None] = b"", timeout: float | None = 120,
              sink: BinaryIO | None = None) -> tuple[int, bytes, bytes]:
        return self._pool.call(self._pool.exec(self, argv, user=user, env=env, stdin=stdin, timeout=timeout,
                                               sink=sink))

    def _script(self, script: str, *args: str, **kwargs: Any) -> tuple[int, bytes, bytes]:
        """A root shell script of this module, checked: a failure raises CommandFailed."""
        code, out, err = self._exec(["sh", "-c", script, "fabula-ssh", *args], **kwargs)
        if code not in (0, MISSING):
            raise CommandFailed(self.name, ["sh", "-c", "...", *args], code, err.decode(errors="replace"))
        return code, out, err

    def run(self, argv, *, user=None, env=None, input=None, timeout=120) -> Result:
        code, out, err = self._exec(argv, user=user, env=env, stdin=(input or "").encode(), timeout=timeout)
        return Result(code, out.decode(errors="replace"), err.decode(errors="replace"))

    def interactive(self, argv: list[str], *, user=None, env=None) -> int:
        """The OpenSSH client (`ssh -t`), so terminals, agents and ~/.ssh/config work. A terminal
        leaves no stdin for the env block: it travels as a 0600 file in /run (memory, not disk),
        which the command line names and SNIPPET removes once read."""
        block = env_block(env)
        _, out, _ = self._script('umask 077; f=$(mktemp -p /run fabula-env.XXXXXX) && cat >"$f" && echo "$f"',
                                 stdin=block)
        path = out.decode().strip()
        command = remote_command(argv, env_source=path, user=user, cwd=str(self.root),
                                 sudo=self.target.user != "root")
        try:
            return subprocess.call([*ssh_argv(self.target, tty=sys.stdin.isatty()), command])
        finally:
            self._exec(["rm", "-f", "--", path])   # read and removed already, unless ssh failed first

    def client_address(self) -> str:
        """This machine's address as the host sees it (sshd's SSH_CLIENT): behind NAT or a jump
        host, the address its firewall must admit for SSH."""
        return self._pool.call(self._pool.login_line(self, 'echo "${SSH_CLIENT%% *}"'))

    def hold(self, argv: list[str], ready: str, timeout: float = 30) -> tuple[Held | None, str]:
        """SshPool.hold on this host."""
        return self._pool.call(self._pool.hold(self, argv, ready, timeout))

    def read(self, path) -> bytes | None:
        code, out, _ = self._script(READ, str(path))
        return None if code == MISSING else out

    def stat(self, path) -> FileState | None:
        code, out, _ = self._script(STAT, str(path))
        if code == MISSING:
            return None
        mode, uid, owner = out.decode().split()
        return FileState(int(mode, 8) & 0o7777, uid if owner == "UNKNOWN" else owner)

    def write(self, path, data: bytes, *, mode: int, owner: str) -> None:
        self._script(WRITE, str(path), owner, f"{mode:o}", stdin=data)

    def push(self, local: Path, path, *, mode=0o600, owner="root") -> None:
        self._script(WRITE, str(path), owner, f"{mode:o}", stdin=_file_chunks(local), timeout=None)

    def fetch(self, path, local: Path) -> None:
        partial = local.with_name(local.name + ".partial")
        try:
            with partial.open("wb") as fh:
                code, _, _ = self._script(READ, str(path), sink=fh, timeout=None)
            if code == MISSING:
                raise FileNotFoundError(f"{self.name}:{path}")
            partial.rename(local)
        finally:
            partial.unlink(missing_ok=True)

    def copy_tree(self, local: Path, path) -> None:
        self._script(UNTAR, str(path), stdin=_tar_chunks(local), timeout=None)


def ssh_argv(target: SshTarget, *, tty: bool) -> list[str]:
    """The OpenSSH client's command for `target`, with the same key, known_hosts and jump host as
    the pool's connections (ProxyCommand rather than -J: -J's own connection would take neither
    this -i nor this known_hosts file)."""
    def options(t: SshTarget) -> list[str]:
        return ["-p", str(t.port), "-l", t.user, *(["-i", str(t.key)] if t.key else []),
                "-o", f"UserKnownHostsFile={t.known_hosts_file()}", "-o", "StrictHostKeyChecking=yes",
                "-o", f"ServerAliveInterval={KEEPALIVE}"]
    argv = ["ssh", "-t" if tty else "-T", *options(target)]
    jump = target.jump_target()
    if jump:
        argv += ["-o", "ProxyCommand=" + shlex.join(["ssh", "-W", "%h:%p", *options(jump), jump.address])]
    return [*argv, target.address]
