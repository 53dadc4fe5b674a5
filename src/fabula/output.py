"""What fabula shows the user: progress on stderr, results (tables, JSON) on stdout."""
from __future__ import annotations

import threading
import time

from rich.console import Console


class Output:
    def __init__(self, quiet: bool = False, console: Console | None = None,
                 err_console: Console | None = None):
        self.console = console or Console()
        self.err = err_console or Console(stderr=True)
        self.quiet = quiet
        self._started = time.monotonic()
        self._lock = threading.Lock()

    def step(self, where: str, message: str) -> None:
        if self.quiet:
            return
        with self._lock:
            elapsed = time.monotonic() - self._started
            self.err.print(f"[dim]{elapsed:6.1f}s[/dim] [bold]{where:<12}[/bold] {message}", highlight=False)

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {message}", highlight=False)

    def error(self, message: str) -> None:
        self.err.print("[red]error:[/red] ", end="", highlight=False)
        self.err.print(message, markup=False, highlight=False)
