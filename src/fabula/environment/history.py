"""The environment's history: one JSON line per operation in ``<env>.history.jsonl`` beside its
directory (``<state root>/<project>/``), appended when the operation ends (who, when, what, each
phase's duration, the outcome).

Beside the directory rather than in it, so that it outlives `fabula destroy`, whose own record is
the last of the environment's life. Mode 0600: who ran what, and their errors, are root's business.
"""
from __future__ import annotations

import json
from pathlib import Path

from fabula.jsonl import append_json_line
from fabula.state import EnvPaths

MODE = 0o600


def history_path(paths: EnvPaths) -> Path:
    return paths.history_file


def append(paths: EnvPaths, record: dict) -> bool:
    """Append one record; False if the project's directory is gone (the state root removed)."""
    return append_json_line(history_path(paths), record, MODE)


def read(paths: EnvPaths) -> tuple[list[dict], int]:
    """Every record, oldest first, and how many lines could not be read."""
    try:
        lines = history_path(paths).read_text().splitlines()
    except FileNotFoundError:
        return [], 0
    records, unreadable = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            unreadable += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            unreadable += 1
    return records, unreadable


def has_record(paths: EnvPaths, record_id: str) -> bool:
    return any(r.get("id") == record_id for r in read(paths)[0])
