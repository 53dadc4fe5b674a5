"""What fabula shows the user: progress on stderr, results (tables, JSON) on stdout."""
from __future__ import annotations

import json
import sys
import threading
import time

from rich.console import Console


class Output:
    def __init__(self, quiet: bool = False, console: Console | None = None,
                 err_console: Console | None = None):
        # a pipe gets 160 columns rather than 80, so that tables stay readable in logs and CI
        self.console = console or (Console() if sys.stdout.isatty() else Console(width=160))
        self.err = err_console or Console(stderr=True)
        self.quiet = quiet
        self._started = time.monotonic()
        self._lock = threading.Lock()

    def step(self, where: str, message: str) -> None:
        if self.quiet:
            return
        with self._lock:
            elapsed = time.monotonic() - self._started
            self.err.print(f"[dim]{elapsed:6.1f}s[/dim] [bold]{where:<12}[/bold] {message}", highlight=False,
                           soft_wrap=True)

    def json(self, data: object) -> None:
        """Machine-readable output: the JSON document alone on stdout."""
        self.console.file.write(json.dumps(data, indent=2) + "\n")
        self.console.file.flush()

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)

    def error(self, message: str) -> None:
        self.err.print("[red]error:[/red] ", end="", highlight=False)
        self.err.print(message, markup=False, highlight=False, soft_wrap=True)
