"""The environment's shared store on its load balancer's host (the one host whose role never
changes: a failover swaps the databases): a team's operators, each with a state directory of their
own, see one lock, one state, one history and one set of secrets.

The lock is `flock` on a file in /run, held by a command that a channel of this process's SSH
connection keeps running: it ends, and the kernel releases the lock, when the command ends, when
fabula dies (its connection closes, and setpriv's parent-death signal), and when nothing is heard
from fabula for HEARTBEAT_TIMEOUT seconds (a laptop that vanished without closing its TCP
connection). So a shared lock is never stale, and never needs `fabula unlock`.

The files live in <env tree>/shared/ (0700, root's), moved as one tar stream each way."""
from __future__ import annotations

import json
import secrets
import tempfile
from pathlib import Path, PurePosixPath

from fabula.errors import FabulaError
from fabula.providers.base import SharedStore, pack_shared, unpack_shared
from fabula.providers.ssh.transport import Held, SshHost

HEARTBEAT = 15            # seconds between the client's heartbeats on the lock's channel
HEARTBEAT_TIMEOUT = 60    # seconds without one before the host lets the lock go
BUSY = 75                 # the lock script's exit status when another holds the lock
INTERRUPTED = "interrupted: "
RELEASED = "released"

# $1 the lock file, $2 the holder file, $3 the holder's record, $4 the line that says "held"
# (bash's, not sh's: dash's `read` has no timeout)
LOCK = f"""exec 9>>"$1" || exit 1
flock -n 9 || {{ cat -- "$2" 2>/dev/null; exit {BUSY}; }}
umask 077
# a holder's record left behind: its command was cut off before it gave the lock back
if [ -s "$2" ]; then printf '{INTERRUPTED}'; head -c 4096 -- "$2"; echo; fi
printf '%s\\n' "$3" > "$2"
echo "$4"
# given back (a "{RELEASED}" line): the record goes; the channel's end or silence without it
# (fabula killed, the connection lost): the record stays, for the next holder to name
while read -r -t {HEARTBEAT_TIMEOUT} line; do
  [ "$line" != {RELEASED} ] || {{ rm -f -- "$2"; exit 0; }}
done
"""
# $1 the lock file, $2 the holder file: the holder's record while the lock is held (no lock file:
# none, and none is made)
HOLDER = """[ -e "$1" ] || exit 0
exec 9>>"$1" || exit 1
if flock -n -s 9; then exit 0; fi
cat -- "$2" 2>/dev/null
exit 0
"""
# $1 the shared folder, $2 a tar file: the folder's files packed into it (exit 3: no folder yet)
PACK = """[ -d "$1" ] || exit 3
umask 077
exec tar -cf "$2" -C "$1" .
"""
# $1 the shared folder, $2 a tar file: unpacked over the folder, then removed
UNPACK = """umask 077
mkdir -p -- "$1" && chmod 700 -- "$1" && tar -xf "$2" --no-same-owner -C "$1"; s=$?
rm -f -- "$2"
exit $s
"""


class HostStore(SharedStore):
    def __init__(self, host: SshHost, folder: PurePosixPath, tag: str):
        self.host, self.folder = host, folder
        self.lock_file = PurePosixPath(f"/run/fabula-{tag}.lock")
        self.holder_file = PurePosixPath(f"/run/fabula-{tag}.holder")
        self._held: Held | None = None
        self._interrupted: dict | None = None

    def interrupted(self) -> dict | None:
        return self._interrupted

    def acquire(self, holder: dict) -> dict | None:
        ready = f"held-{secrets.token_hex(8)}"
        held, printed = self.host.hold(["bash", "-c", LOCK, "bash", str(self.lock_file), str(self.holder_file),
                                        json.dumps(holder), ready], ready)
        if held is None:
            return _record(printed) or {"owner": "another fabula", "command": "?"}
        left = [line for line in printed.splitlines() if line.startswith(INTERRUPTED)]
        self._interrupted = _record(left[-1].removeprefix(INTERRUPTED)) if left else None
        self._held = held
        held.every(HEARTBEAT, b"\n")
        return None

    def release(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            held.close(last=RELEASED.encode() + b"\n")

    def holder(self) -> dict | None:
        result = self.host.run(["sh", "-c", HOLDER, "sh", str(self.lock_file), str(self.holder_file)])
        return _record(result.stdout) if result.ok else None

    def pull(self, files: dict[str, Path]) -> None:
        remote = PurePosixPath(f"/run/fabula-pull-{secrets.token_hex(6)}.tar")
        packed = self.host.run(["sh", "-c", PACK, "sh", str(self.folder), str(remote)])
        if packed.returncode == 3:
            return   # nothing shared yet: the first create
        if not packed.ok:
            raise FabulaError(f"{self.host.name}: cannot read the environment's shared files in {self.folder}: "
                              f"{packed.stderr.strip()[-500:]}")
        with tempfile.TemporaryDirectory(prefix="fabula-shared-") as tmp:
            archive = Path(tmp) / "shared.tar"
            try:
                self.host.fetch(remote, archive)
            finally:
                self.host.run(["rm", "-f", "--", str(remote)])
            with open(archive, "rb") as stream:
                unpack_shared(stream, files)

    def push(self, files: dict[str, Path]) -> None:
        remote = PurePosixPath(f"/run/fabula-push-{secrets.token_hex(6)}.tar")
        with tempfile.TemporaryDirectory(prefix="fabula-shared-") as tmp:
            archive = Path(tmp) / "shared.tar"
            with open(archive, "wb") as stream:
                pack_shared(files, stream)
            self.host.push(archive, remote)
        self.host.check(["sh", "-c", UNPACK, "sh", str(self.folder), str(remote)])


def _record(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        try:
            found = json.loads(line)
        except ValueError:
            continue
        if isinstance(found, dict):
            return found
    if text.strip():
        raise FabulaError(f"the shared lock's holder record is unreadable: {text.strip()[:200]}")
    return None
