"""`fabula release ...`, `fabula history`, `fabula unlock`: releases and the record of operations."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
