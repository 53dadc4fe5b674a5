"""The `fabula` command: parse, call an operation, print. Nothing else lives here; each module
of this package registers its commands on the one Typer app."""
from __future__ import annotations

import sys

import typer

from fabula.cli import db as db_commands, deploy as deploy_commands, environment as environment_commands
from fabula.cli import scaling as scaling_commands
from fabula.errors import FabulaError
from fabula.output import Output

app = typer.Typer(help="Create, deploy and operate a Django production architecture.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
for module in (environment_commands, deploy_commands, db_commands, scaling_commands):
    module.register(app)


def main() -> None:
    try:
        app()  # standalone: usage errors are printed by typer and exit with status 2
    except FabulaError as exc:
        Output().error(str(exc))
        sys.exit(exc.exit_status)
