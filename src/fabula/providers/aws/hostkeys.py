"""The host keys of fabula's instances in the operator's known_hosts file: recorded when fabula
makes an instance (its key is new, and nothing but the instance can present it yet: trust on
first use, at the instance's first minute) and removed when the instance goes, so that a new
instance at the same private address is not refused as an attack. Only the lines fabula wrote
are ever removed: it keeps them in the environment's state directory."""
from __future__ import annotations

import json
from pathlib import Path

from fabula.providers.ssh.transport import recorded_keys
from fabula.state import write_atomically

RECORD = "known_hosts.fabula.json"


class KnownHosts:
    def __init__(self, known_hosts: Path, record: Path):
        self.path, self.record = known_hosts, record

    def _written(self) -> dict[str, str]:
        """What fabula wrote: known_hosts name ("10.40.0.4" or "[10.40.0.4]:2222") -> its line."""
        try:
            return dict(json.loads(self.record.read_text()))
        except FileNotFoundError:
            return {}

    def _lines(self) -> list[str]:
        return self.path.read_text().splitlines(keepends=True) if self.path.is_file() else []

    def keys(self, name: str) -> list[str]:
        """The keys ("ssh-ed25519 AAAA...") the file holds for `name` (its hashed lines too)."""
        return recorded_keys(self.path, name)

    def has(self, name: str) -> bool:
        return any(name in line.split(" ", 1)[0].split(",") for line in self._lines() if not line.startswith("#"))

    def add(self, name: str, key: str) -> bool:
        """Record `key` ("ssh-ed25519 AAAA...") for `name` unless a line names it; True if written.
        A line of fabula's own for that name (a former instance's) is replaced."""
        self.forget([name])
        if self.has(name):
            return False
        line = f"{name} {key.strip()}\n"
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(line)
        written = {**self._written(), name: line}
        write_atomically(self.record, json.dumps(written).encode(), mode=0o600)
        return True

    def forget(self, names: list[str] | None = None) -> list[str]:
        """Remove the lines fabula wrote for `names` (all of them: None); the names removed."""
        written = self._written()
        gone = {n: line for n, line in written.items() if names is None or n in names}
        if not gone:
            return []
        kept = [line for line in self._lines() if line not in gone.values()]
        if self.path.is_file():
            write_atomically(self.path, "".join(kept).encode(), mode=self.path.stat().st_mode & 0o777)
        rest = {n: line for n, line in written.items() if n not in gone}
        if rest:
            write_atomically(self.record, json.dumps(rest).encode(), mode=0o600)
        else:
            self.record.unlink(missing_ok=True)
        return sorted(gone)
