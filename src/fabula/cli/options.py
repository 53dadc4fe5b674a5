"""The arguments and options every command shares."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOption = Annotated[Path, typer.Option("-c", "--config", help="path of fabula.yml")]
EnvArgument = Annotated[str, typer.Argument(help="environment name, as under `environments:` in fabula.yml")]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output")]
DEFAULT_CONFIG = Path("fabula.yml")
