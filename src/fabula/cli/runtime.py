"""What a run of the CLI takes from its surroundings (httpie's `Environment`): its streams, whether
a person is at the terminal, who runs it and where the state lives. `main(argv, env)` is given
one; tests run the CLI in-process with their own."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import typer
from rich.console import Console

from fabula.context import Context
from fabula.environment.opening import open_environment
from fabula.output import Output
from fabula.state import state_root


@dataclass(frozen=True)
class CliEnvironment:
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    stdin_isatty: bool = field(default_factory=lambda: sys.stdin.isatty())
    euid: int = field(default_factory=os.geteuid)
    state_root: Path = field(default_factory=state_root)

    def output(self) -> Output:
        # a pipe gets 160 columns rather than 80, so that tables stay readable in logs and CI
        tty = self.stdout.isatty() if hasattr(self.stdout, "isatty") else False
        console = Console(file=self.stdout) if tty else Console(file=self.stdout, width=160)
        return Output(console=console, err_console=Console(file=self.stderr))


def cli_environment(cli: typer.Context) -> CliEnvironment:
    """The environment `main` was given (the command's context object), or the process's."""
    return cli.obj if isinstance(cli.obj, CliEnvironment) else CliEnvironment()


def open_env(cli: typer.Context, config: Path, env_name: str, shared: bool = True) -> Context:
    """Open ENV of fabula.yml for a command, with the CLI's streams, user and state root (and,
    unless `shared` is False, this machine's copy of a team's environment refreshed)."""
    environment = cli_environment(cli)
    return open_environment(config, env_name, environment.output(), root=environment.state_root,
                            euid=environment.euid, shared=shared)
