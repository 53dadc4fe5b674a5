"""The autoscaler's records in the environment's directory: the decisions log (every change, and
every change held back, with its reason: `fabula autoscaling ENV decisions`) and the status file
(its last measurement, for `fabula describe`).

Both are root's (mode 0600) and never written through a symlink (O_NOFOLLOW); neither brings
back the directory of a destroyed environment.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from fabula.environment import lock
from fabula.jsonl import append_json_line
from fabula.state import EnvPaths

DECISIONS_FILE = "autoscaler.jsonl"
STATUS_FILE = "autoscaler.status.json"
MODE = 0o600


def decisions_path(paths: EnvPaths) -> Path:
    return paths.env_dir / DECISIONS_FILE


def status_path(paths: EnvPaths) -> Path:
    return paths.env_dir / STATUS_FILE


def log_decision(path: Path, entry: dict) -> None:
    """Append one decision (one JSON line) if the environment exists."""
    append_json_line(path, {"time": lock.now_iso(), "ts": round(time.time(), 3), **entry}, MODE)


def read_decisions(path: Path, last: int | None = None) -> list[dict]:
    """The decisions, oldest first (the `last` ones only); a torn or foreign line is skipped."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    found = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            found.append(entry)
    return found[-last:] if last else found


def write_status(path: Path, status: dict) -> None:
    """The autoscaler's last measurement, for `describe` (replaced whole; losing it costs nothing)."""
    if not path.parent.is_dir():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, MODE)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(status))
    os.replace(tmp, path)


def read_status(path: Path) -> dict | None:
    """The last measurement, or None (none yet, or unreadable)."""
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None
