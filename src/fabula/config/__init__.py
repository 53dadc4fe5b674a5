"""fabula.yml, loaded and validated once: `load_config`. The schema is in schema.py (each
provider's section in providers.py), what a value may be in values.py, the reading of the file in
yamlfile.py, and the checks against the machine in machine.py.

Every error names the file, the key path and what is expected, ends with a `fix:` line, and is
raised before anything is created. Nothing of the input is echoed beyond a short excerpt.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from fabula.config.machine import check_machine, resolve
from fabula.config.providers import SshConfig
from fabula.config.schema import AutoscalingConfig, EnvironmentConfig, LoadBalancerConfig, LoadedConfig, ProjectConfig
from fabula.config.values import MAX_ERRORS, ROLES, cut, excerpt, shown_path
from fabula.config.yamlfile import parse_file, read_open_file
from fabula.errors import ConfigError

__all__ = ["ROLES", "AutoscalingConfig", "EnvironmentConfig", "LoadBalancerConfig", "LoadedConfig", "SshConfig",
           "load_config", "read_open_file", "shown_path"]

# -- validation errors as messages ----------------------------------------------------------------

def _key_path(loc: tuple) -> str:
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            text = item if isinstance(item, str) and item.isprintable() else excerpt(item, 40)
            parts.append(("." if parts else "") + (text if len(text) <= 40 else excerpt(text, 40)))
    return "".join(parts) or "(top level)"


def _explain(error: ErrorDetails) -> str:
    kind, msg = error["type"], error["msg"]
    loc = list(error["loc"])
    if kind == "extra_forbidden":
        if len(loc) >= 2 and loc[-2] == "servers":
            return f"unknown role {excerpt(loc[-1], 40)}: expected one of {', '.join(ROLES)}"
        return f"unknown key {excerpt(loc[-1], 40)}: remove it or check its spelling"
    if kind == "missing":
        return "required key is missing"
    if kind == "greater_than_equal" and len(loc) >= 2 and loc[-2] == "servers":
        return f"at least {error['ctx']['ge']} {loc[-1]} server(s) are needed (got {excerpt(error.get('input'))})"
    msg = cut(msg.removeprefix("Value error, "), 400)
    return f"{msg} (got {excerpt(error.get('input'))})" if kind not in ("value_error", "model_type") else msg


def _hint(error: ErrorDetails, key: str, shown: str) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"remove `{key}` from {shown}, or correct its spelling"
    if kind == "missing":
        return f"add `{key}` to {shown}"
    return f"correct `{key}` in {shown}"


def _location(error: ErrorDetails) -> tuple:
    """Where the error is: its model's place, and the key of that model a validator named (key_error)."""
    key = (error.get("ctx") or {}).get("key")
    return tuple(error["loc"]) + (tuple(key.split(".")) if isinstance(key, str) and key else ())


def _validation_error(exc: ValidationError, shown: str) -> ConfigError:
    errors = exc.errors()
    lines, hints = [], []
    for e in errors[:MAX_ERRORS]:
        e["loc"] = _location(e)
        key = _key_path(e["loc"])
        lines.append(f"{shown}: {key}: {_explain(e)}" if e["loc"] else f"{shown}: {_explain(e)}")
        hints.append(_hint(e, key, shown) if e["loc"] else f"correct {shown} as said above")
    if len(errors) > MAX_ERRORS:
        lines.append(f"{shown}: ... and {len(errors) - MAX_ERRORS} more errors")
    return ConfigError("\n".join(lines), "; ".join(dict.fromkeys(hints)))



def load_config(path: Path, *, check_paths: bool = True) -> LoadedConfig:
    """fabula.yml, validated; `check_paths`: and the files it names checked on this machine (not
    where fabula's program runs away from the app's folder, on the platform host)."""
    path = Path(path)
    shown = shown_path(path)
    raw = parse_file(path, shown)
    if not isinstance(raw, dict):
        raise ConfigError(f"{shown}: expected a mapping with `project`, `app` and `environments`",
                          f"write {shown} as in the README: `project:`, `app:` and `environments:` at the top level")
    try:
        project = ProjectConfig.model_validate(raw)
    except ValidationError as exc:
        raise _validation_error(exc, shown) from None
    loaded = LoadedConfig(path=resolve(path), project=project)
    if not check_paths:
        return loaded
    try:
        check_machine(loaded, shown)
    except (OSError, ValueError) as exc:  # a name too long, a loop of symlinks... on the way to a path
        where = shown_path(getattr(exc, "filename", None) or "a path it names")
        raise ConfigError(f"{shown}: cannot check {where}: {getattr(exc, 'strerror', None) or cut(str(exc), 200)}",
                          f"correct the paths in {shown} (app.source, app.requirements, app.manage, "
                          "app.maintenance_page, app.python, db.backups, lb.certificate, lb.key)") from None
    return loaded

