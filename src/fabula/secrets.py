"""Per-environment secrets: generated once, kept 0600 outside the repository, never printed."""
from __future__ import annotations

import json
import secrets as _random
from dataclasses import dataclass

from fabula.state import EnvPaths, write_atomically

NAMES = ("django_secret_key", "db_app_password", "db_replication_password",
         "redis_password", "rabbitmq_password")


@dataclass(frozen=True, repr=False)
class Secrets:
    django_secret_key: str
    db_app_password: str
    db_replication_password: str
    redis_password: str
    rabbitmq_password: str

    def __repr__(self) -> str:  # never show values in tracebacks or logs
        return "Secrets(<hidden>)"


def load_or_create(paths: EnvPaths) -> Secrets:
    path = paths.secrets_dir / "secrets.json"
    paths.secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths.secrets_dir.chmod(0o700)
    values = json.loads(path.read_text()) if path.exists() else {}
    missing = [n for n in NAMES if n not in values]
    if missing:
        for name in missing:
            # URL-safe and without characters that need quoting in URLs, INI or YAML
            values[name] = _random.token_hex(24) if name != "django_secret_key" else _random.token_urlsafe(50)
        write_atomically(path, json.dumps(values).encode(), mode=0o600)
    return Secrets(**{n: values[n] for n in NAMES})
