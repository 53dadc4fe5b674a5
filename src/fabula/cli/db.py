"""`fabula db ...`: replication status, failover, replicas, backups."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    db_app = typer.Typer(help="Database operations: status, promote, reset-replicas, backups, copy.",
                         no_args_is_help=True)
    app.add_typer(db_app, name="db")
