"""What can only be checked against the machine: the files, folders and programs that
fabula.yml names."""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from fabula.config.providers import HOST_TREE, SshConfig
from fabula.config.schema import AppConfig, EnvironmentConfig, LoadedConfig
from fabula.config.values import MAX_PEM_BYTES, PYTHON_NAME, SYSTEM_DIRS, SYSTEM_TREES, shown_path
from fabula.config.yamlfile import read_regular_file
from fabula.errors import ConfigError

# -- what can only be checked against the machine: files, folders, programs -----------------------

def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a name too long
        return Path(os.path.abspath(path))


def _check_app_file(app: AppConfig, key: str, base: Path, source: Path, relative_only: bool) -> str | None:
    value = getattr(app, key)
    if value is None:
        return None
    path = Path(value)
    if relative_only and path.is_absolute():
        return f"{value} is an absolute path: give it relative to app.source ({shown_path(source)})"
    resolved = resolve(base / path)
    if not _inside(resolved, source):
        return (f"{shown_path(value)} is outside the app's folder {shown_path(source)} (it resolves to "
                f"{shown_path(resolved)}): it must be a file of the app")
    explicit = key in app.model_fields_set
    if (explicit or resolved.exists()) and not resolved.is_file():
        return f"{shown_path(value)} is not a file in {shown_path(source)}"
    return None


def _check_python(value: str) -> str | None:
    path = Path(value)
    if not path.is_absolute():
        return f"{shown_path(value)}: an absolute path of a Python interpreter is expected, e.g. /usr/bin/python3"
    resolved = resolve(path)
    try:
        info = resolved.stat()
    except (OSError, ValueError):
        return f"{shown_path(value)} does not exist"
    if not stat.S_ISREG(info.st_mode):
        return f"{shown_path(value)} is not a file"
    if not re.fullmatch(PYTHON_NAME, resolved.name, re.ASCII):
        return (f"{shown_path(value)} resolves to {shown_path(resolved)}, whose name is not python3 or "
                "python3.N: a Python 3 interpreter is expected")
    if not info.st_mode & 0o111:
        return f"{shown_path(resolved)} is not executable"
    if info.st_uid != 0 or info.st_mode & 0o022:
        return (f"{shown_path(resolved)} must be owned by root and writable by no one else (fabula runs it as "
                f"root; owner uid {info.st_uid}, mode {stat.filemode(info.st_mode)})")
    return None


def _system_directory(resolved: Path, trees: tuple[str, ...] = SYSTEM_TREES) -> bool:
    """One of the system's directories, or inside one of its trees."""
    text = str(resolved)
    return text in SYSTEM_DIRS or text in SYSTEM_TREES or any(_inside(resolved, Path(t)) for t in trees)


def _check_backups(value: Path) -> str | None:
    if not value.is_absolute():
        return f"{shown_path(value)}: an absolute path is expected, e.g. /srv/backups/polls"
    resolved = resolve(value)
    if _system_directory(resolved):
        return (f"{shown_path(value)}" + (f" (resolved: {shown_path(resolved)})" if resolved != value else "")
                + " is a system directory, or inside one: fabula would own it")
    # every folder on the way must be root's and writable by no one else (a sticky /tmp is fine
    # on the way, but not as the folder that would hold a new one)
    existing = resolved
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    for folder in [existing, *existing.parents]:
        info = folder.stat()
        if folder == existing and existing != resolved:
            if not stat.S_ISDIR(info.st_mode):
                return f"{shown_path(folder)} is not a directory"
            if info.st_mode & 0o022 or info.st_uid != 0:
                return (f"{shown_path(resolved)} does not exist and {shown_path(folder)} is writable by others "
                        f"or not root's: create {shown_path(resolved)} first (owned by root, mode 0700)")
            continue
        if folder == resolved:
            if not stat.S_ISDIR(info.st_mode):
                return f"{shown_path(value)} is not a directory"
            if info.st_uid != 0 or info.st_mode & 0o022:
                return (f"{shown_path(resolved)} must be owned by root and writable by no one else (owner uid "
                        f"{info.st_uid}, mode {stat.filemode(info.st_mode)})")
            continue
        if info.st_uid != 0 or (info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX):
            return (f"{shown_path(folder)}, a folder above {shown_path(resolved)}, must be owned by root and "
                    "writable by no one else")
    return None


def _check_host_backups(value: Path) -> str | None:
    """db.backups with db.backups_host: a folder on that host, checked as a path here (the host
    itself checks the folder when a backup is made: a real folder, root's, writable by no one else)."""
    if not value.is_absolute():
        return f"{shown_path(value)}: an absolute path on the backups host is expected, e.g. /var/backups/polls"
    if ".." in value.parts:
        return f"{shown_path(value)}: a path without `..` is expected"
    if _system_directory(value):
        return f"{shown_path(value)} is a system directory, or inside one: fabula would own it"
    if _inside(value, Path(HOST_TREE)) or value == Path(HOST_TREE):
        return (f"{shown_path(value)} is inside fabula's tree on the hosts ({HOST_TREE}), whose environment folders "
                f"`destroy` removes: leave db.backups out (backups go to {HOST_TREE}/backups/<project>/<env>), "
                "or choose a folder of your own")
    return None


def _check_tls_pair(env: EnvironmentConfig, base: Path, shown: str, name: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    lb = env.lb
    assert lb.certificate is not None and lb.key is not None
    cert_path, key_path = resolve(base / lb.certificate), resolve(base / lb.key)
    where = f"environments.{name}.lb"
    hint = f"in {shown}, point {where}.certificate and {where}.key at a PEM certificate and its unencrypted key"
    cert_pem = read_regular_file(cert_path, MAX_PEM_BYTES, "a PEM certificate", f"{shown}: {where}.certificate: "
                                 f"{shown_path(cert_path)}", hint)
    key_pem = read_regular_file(key_path, MAX_PEM_BYTES, "a PEM private key", f"{shown}: {where}.key: "
                                f"{shown_path(key_path)}", hint)
    try:
        certificate = x509.load_pem_x509_certificates(cert_pem)[0]
    except Exception:  # noqa: BLE001 - cryptography raises ValueError and friends for any bad input
        raise ConfigError(f"{shown}: {where}.certificate: {shown_path(cert_path)} holds no PEM certificate",
                          hint) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(f"{shown}: {where}.key: {shown_path(key_path)} is encrypted: HAProxy needs it "
                          "unencrypted (mode 0600)", hint) from None
    except Exception:  # noqa: BLE001
        raise ConfigError(f"{shown}: {where}.key: {shown_path(key_path)} holds no PEM private key", hint) from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        matches = certificate.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
    except Exception:  # noqa: BLE001 - a key type without a public form
        matches = False
    if not matches:
        raise ConfigError(f"{shown}: {where}: the key {shown_path(key_path)} is not the key of the certificate "
                          f"{shown_path(cert_path)}", hint)
    lb.certificate, lb.key = cert_path, key_path


def check_machine(loaded: LoadedConfig, shown: str) -> None:
    """Paths and programs named by the configuration, checked against the machine."""
    base, app = loaded.path.parent, loaded.project.app
    source = loaded.source_dir
    fix_source = f"in {shown}, point app.source at the Django project's folder (relative to {shown_path(base)})"
    if not source.is_dir():
        raise ConfigError(f"{shown}: app.source: folder {shown_path(source)} does not exist", fix_source)
    # the app's files (requirements, manage.py, the maintenance page that every web server serves)
    # are checked to lie inside it: with / as the source, /etc/shadow would be one
    # (a folder of the user's in /var/tmp is fine for code; db.backups may not be there)
    if _system_directory(source, trees=tuple(t for t in SYSTEM_TREES if t != "/var/tmp")):
        raise ConfigError(f"{shown}: app.source: {shown_path(source)} is a system directory, or inside one, "
                          "not the Django project's own folder", fix_source)
    problems = []
    for key, folder, relative_only in (("requirements", source, True), ("manage", source, True),
                                       ("maintenance_page", base, False)):
        problem = _check_app_file(app, key, folder, source, relative_only)
        if problem:
            problems.append((f"app.{key}", problem))
    if "python" in app.model_fields_set:
        problem = _check_python(app.python)
        if problem:
            problems.append(("app.python", problem))
    for name, env in loaded.project.environments.items():
        if env.db.backups is not None:
            check = _check_host_backups if env.db.backups_host else _check_backups
            problem = check(env.db.backups)
            if problem:
                problems.append((f"environments.{name}.db.backups", problem))
    if problems:
        raise ConfigError("\n".join(f"{shown}: {key}: {problem}" for key, problem in problems),
                          "; ".join(f"correct `{key}` in {shown}" for key, _ in problems))
    if app.maintenance_page is not None:
        app.maintenance_page = resolve(base / app.maintenance_page)
    for name, env in loaded.project.environments.items():
        if env.lb.certificate is not None:
            _check_tls_pair(env, base, shown, name)
        if env.ssh is not None:
            _check_ssh_files(env.ssh, base, shown, name)


def _check_ssh_files(ssh: SshConfig, base: Path, shown: str, name: str) -> None:
    """`~` and paths relative to fabula.yml's folder made absolute; the key must be readable."""
    for key in ("key", "known_hosts"):
        value = getattr(ssh, key)
        if value is not None:
            setattr(ssh, key, resolve(base / Path(os.path.expanduser(value))))
    if ssh.key is not None:
        where = f"{shown}: environments.{name}.ssh.key: {shown_path(ssh.key)}"
        read_regular_file(ssh.key, MAX_PEM_BYTES, "an SSH private key", where,
                          f"in {shown}, point environments.{name}.ssh.key at your private key (e.g. "
                          "~/.ssh/id_ed25519), or leave it out to use the ssh agent")


