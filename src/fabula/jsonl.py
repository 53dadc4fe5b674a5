"""Appending to a JSON-lines log (the environment's history, the autoscaler's decisions).

Not write_atomically (which replaces the whole file): these logs are only ever appended to, and
one write(2) of one line with O_APPEND lands whole after the others, also from concurrent
writers. A crash can at worst leave a torn last line, which their readers skip.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def append_json_line(path: Path, record: dict, mode: int = 0o600) -> bool:
    """Append `record` as one JSON line (keys sorted); False if the file's directory is gone.

    No mkdir: a record must not bring back the directory of a destroyed environment or a removed
    state root. Never through a symlink (O_NOFOLLOW): root writes these files."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileNotFoundError:
        return False
    try:
        if os.fstat(fd).st_mode & 0o777 != mode:
            os.fchmod(fd, mode)  # e.g. written by an older fabula
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True
