"""Per-environment secrets: generated once, kept 0600 outside the repository, never printed.

Generated under a lock: two commands running at once on a new environment (two `create`s, or
`create` and the autoscaler) must end with one set of secrets that both use, not each its own
with the last writer's replacing the first's after the first configured servers with them.
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets as _random
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fabula.errors import FabulaError
from fabula.state import EnvPaths, write_atomically

NAMES = ("django_secret_key", "db_app_password", "db_replication_password",
         "redis_password", "rabbitmq_password")
FILE = "secrets.json"
LOCK_FILE = ".lock"


@dataclass(frozen=True, repr=False)
class Secrets:
    django_secret_key: str
    db_app_password: str
    db_replication_password: str
    redis_password: str
    rabbitmq_password: str

    def __repr__(self) -> str:  # never show values in tracebacks or logs
        return "Secrets(<hidden>)"


def _private_dir(paths: EnvPaths) -> None:
    """The secrets directory: fabula's own, 0700, a real directory (not a symlink to elsewhere)."""
    folder = paths.secrets_dir
    paths.make_env_dir()
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise FabulaError(f"{folder} is not a directory (a symlink?): fabula keeps the environment's "
                          "secrets there and will not write them elsewhere",
                          f"remove {folder}; the next `fabula create` makes it again")
    if info.st_uid != os.geteuid():
        raise FabulaError(f"{folder} belongs to uid {info.st_uid}, not to the user fabula runs as",
                          f"`chown -R root: {folder}` if it is yours, or remove it")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(folder, 0o700)


def _read(path) -> dict:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise FabulaError(f"cannot read {path}: {exc.strerror}", f"remove {path} if it is not fabula's") from None
    with os.fdopen(fd) as fh:
        values = json.load(fh)
    if not isinstance(values, dict):
        raise FabulaError(f"{path} is not a secrets file", f"remove {path}")
    return values


def load_or_create(paths: EnvPaths) -> Secrets:
    """The environment's secrets, generating those missing: read, generate and write are one step
    under an exclusive lock (flock on a file in the secrets directory), so concurrent first runs
    all see the secrets the first of them wrote."""
    _private_dir(paths)
    path = paths.secrets_dir / FILE
    lock_fd = os.open(paths.secrets_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        values = _read(path)
        missing = [n for n in NAMES if n not in values]
        if missing:
            for name in missing:
                # URL-safe and without characters that need quoting in URLs, INI or YAML
                values[name] = _random.token_hex(24) if name != "django_secret_key" else _random.token_urlsafe(50)
            write_atomically(path, json.dumps(values).encode(), mode=0o600)
    finally:
        os.close(lock_fd)  # releases the flock
    return Secrets(**{n: values[n] for n in NAMES})


SSH_KEY_FILE = "ssh_ed25519"


def ssh_key(paths: EnvPaths) -> Path:
    """The environment's own SSH key (OpenSSH ed25519, 0600 beside the secrets, which a team's
    shared store carries to every operator), made once under the secrets' lock; its public half
    is `<path>.pub`. For providers that make their servers and give them a key (aws) when
    fabula.yml names none (`ssh.key`)."""
    _private_dir(paths)
    path = paths.secrets_dir / SSH_KEY_FILE
    lock_fd = os.open(paths.secrets_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if not path.is_file():
            key = ed25519.Ed25519PrivateKey.generate()
            public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            write_atomically(path.with_name(SSH_KEY_FILE + ".pub"), public + f" fabula-{paths.tag}\n".encode(),
                             mode=0o644)
            write_atomically(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                     serialization.NoEncryption()), mode=0o600)
    finally:
        os.close(lock_fd)
    return path
