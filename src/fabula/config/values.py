"""What a value of fabula.yml may be: the patterns, limits and text checks every section uses,
and how a value is quoted in an error message (a short excerpt, never the whole input)."""
from __future__ import annotations

import ipaddress
import re
import unicodedata
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
)
from pydantic_core import PydanticCustomError

ROLES = ("web", "worker", "cache", "db-primary", "db-replica")
# patterns are matched whole (re.fullmatch, ASCII only): "testing\n" is not a name
SLUG = r"[a-z][a-z0-9-]{0,19}"
DOTTED_CALLABLE = r"[A-Za-z_][A-Za-z0-9_.]*(:[A-Za-z_][A-Za-z0-9_]*)?"
DOTTED_NAME = r"[A-Za-z_][A-Za-z0-9_.]*"
MAX_CONFIG_BYTES = 1 << 20   # fabula.yml is a few hundred bytes; more is a mistake
MAX_DEPTH = 32               # fabula.yml nests 4 levels deep
MAX_NUMBER_CHARS = 64        # a number written with more characters than this is no count or port
EXCERPT = 80                 # characters of an input value an error message may show
MAX_ERRORS = 10              # errors listed in one message
MAX_PEM_BYTES = 1 << 20
RFC1918 = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
# directories that belong to the system: db.backups and app.source may be none of them (nor be
# inside the first set)
SYSTEM_TREES = ("/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/boot", "/dev",
                "/proc", "/sys", "/run", "/var/run", "/var/lock", "/var/tmp", "/var/log", "/var/spool",
                "/var/cache", "/var/mail")
SYSTEM_DIRS = ("/", "/var", "/tmp", "/root", "/home", "/opt", "/srv", "/mnt", "/media", "/snap",
               "/var/lib", "/var/backups", "/var/opt", "/var/local", "/usr/local", "/lost+found")
PYTHON_NAME = r"python3(\.[0-9]{1,3})?"


def excerpt(value: Any, limit: int = EXCERPT) -> str:
    """repr(value), cut to `limit` characters: error messages never grow with the input."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    except Exception:  # noqa: BLE001 - only for the message
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def cut(text: str, limit: int) -> str:
    """Text of ours (that may quote the input) for a message: printable, at most `limit` characters."""
    if not text.replace("\n", " ").isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else text[:limit] + "..."


def shown_path(path: Path | str, limit: int = 160) -> str:
    """A path for a message: printable, and at most `limit` characters (its end kept)."""
    text = str(path)
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else "..." + text[-limit:]


# -- strings that end up in configuration files ---------------------------------------------------

def unsafe_character(value: str) -> str | None:
    """The first character that may not be in a value fabula writes into a configuration file
    (supervisor, INI, nginx, HAProxy...): control characters (newlines included), quotes,
    backslashes and backquotes; None when there is none."""
    for char in value:
        if char in "\"'\\`" or unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            return char
    return None


def _safe_text(value: str) -> str:
    char = unsafe_character(value)
    if char is not None:
        raise ValueError(f"{excerpt(char)} is not allowed here (no control characters, newlines, quotes "
                         f"or backslashes; got {excerpt(value)})")
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _safe_path_text(value: Any) -> Any:
    if isinstance(value, str):
        if len(value) > 1024:
            raise ValueError(f"a path of at most 1024 characters is expected (got {len(value)})")
        _safe_text(value)
    return value


def pattern(regex: str, what: str):
    compiled = re.compile(regex, re.ASCII)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"{what} is expected, matching {regex} (got {excerpt(value)})")
        return value
    return AfterValidator(check)


HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", re.ASCII)


def _host_name(value: str) -> str:
    """An RFC 1123 host name (a leading `.` allowed: Django's ALLOWED_HOSTS subdomain wildcard),
    or an IP address."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    name = value[1:] if value.startswith(".") else value
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    if len(name) > 253 or not all(HOST_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise ValueError(f"a host name (letters, digits and '-' in dot-separated labels) or an IP address "
                         f"is expected (got {excerpt(value)})")
    return value


SafeText = Annotated[str, Field(max_length=1024), AfterValidator(_safe_text)]
SafePath = Annotated[Path, BeforeValidator(_safe_path_text)]
Slug = Annotated[str, pattern(SLUG, "a name of lower-case letters, digits and '-' (at most 20)")]
DottedCallable = Annotated[str, Field(max_length=255),
                           pattern(DOTTED_CALLABLE, "a Python path like `pkg.module:name`")]
DottedName = Annotated[str, Field(max_length=255), pattern(DOTTED_NAME, "a Python module path like `pkg.settings`")]
HostName = Annotated[str, Field(max_length=253), AfterValidator(_host_name)]



def key_error(key: str, message: str) -> PydanticCustomError:
    """An error of a model's validator that belongs to one of its keys (`key`, dotted, e.g.
    "db.backups_host"): the message and its `fix:` line name that key, not the whole model."""
    return PydanticCustomError("value_error", "{message}", {"message": message, "key": key})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


Port = Annotated[int, Field(ge=1, le=65535)]
