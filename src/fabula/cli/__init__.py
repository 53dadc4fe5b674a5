"""The `fabula` command: parse, call an operation, print. Nothing else lives here; each module
of this package registers its commands on the one Typer app."""
from __future__ import annotations

import sys

import typer

# typer 0.29 (pinned) carries its own copy of click, whose usage errors it raises
from typer._click.exceptions import ClickException as TyperUsageError

from fabula.cli import db as db_commands
from fabula.cli import deploy as deploy_commands
from fabula.cli import environment as environment_commands
from fabula.cli import scaling as scaling_commands
from fabula.cli.runtime import CliEnvironment
from fabula.errors import ExitStatus, FabulaError

app = typer.Typer(help="Create, deploy and operate a Django production architecture.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
for module in (environment_commands, deploy_commands, db_commands, scaling_commands):
    module.register(app)


def main(argv: list[str] | None = None, env: CliEnvironment | None = None) -> int:
    """Run `fabula ARGV` (default: the process's arguments) in `env` (default: the process's
    streams, user and state root); its exit status: 0, 1 for a failed action, 2 for bad input or
    usage, 3 without root (errors.ExitStatus)."""
    env = env or CliEnvironment()
    try:
        result = app(args=sys.argv[1:] if argv is None else argv, prog_name="fabula", standalone_mode=False,
                     obj=env)
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        env.stderr.write("Aborted.\n")
        return int(ExitStatus.ERROR)
    except TyperUsageError as exc:  # a usage error: typer's own message, the status it gives (2)
        exc.show(file=env.stderr)
        return exc.exit_code
    except FabulaError as exc:
        env.output().error(str(exc))
        return int(exc.exit_status)
    return result if isinstance(result, int) else int(ExitStatus.OK)
