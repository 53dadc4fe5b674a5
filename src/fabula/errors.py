"""Errors a user can act on: each names the thing that is wrong and the fix."""
from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    OK = 0
    ERROR = 1          # an action failed; the message says where and what to do
    BAD_INPUT = 2      # configuration or arguments are wrong; nothing was changed
    NOT_PERMITTED = 3  # fabula needs root for the local provider


class FabulaError(Exception):
    """An error with a message for the user and, where there is one, the fix."""

    exit_status = ExitStatus.ERROR

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class ConfigError(FabulaError):
    exit_status = ExitStatus.BAD_INPUT


class PrerequisiteError(FabulaError):
    exit_status = ExitStatus.BAD_INPUT


class PermissionError_(FabulaError):
    exit_status = ExitStatus.NOT_PERMITTED


class CommandFailed(FabulaError):
    """A command on a server failed; carries its output for the user."""

    def __init__(self, server: str, argv: list[str], returncode: int, output: str):
        tail = "\n".join(output.strip().splitlines()[-15:])
        super().__init__(
            f"{server}: `{' '.join(argv)}` exited with {returncode}" + (f":\n{tail}" if tail else "")
        )
        self.returncode = returncode
        self.output = output
