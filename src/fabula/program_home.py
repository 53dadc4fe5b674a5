"""Where fabula's own long-running program (the autoscaler, which on a platform's own group is the
group's keeper) runs on the platform host: its interpreter, its fabula.yml, its state directory.

On a platform host that shares this machine's files (the local provider's namespaces) that is
this machine's interpreter, config and state root. On one that does not (an AWS worker), fabula
ships itself: a relocatable virtualenv of fabula and the exact versions of its dependencies that
run here (built once per fabula, from uv's cache, as root: it holds no code of the app's), the
environment's fabula.yml, and a state directory of the program's own, whose shared files (state,
secrets, certificate authority) the program pulls from the team's store as any operator does.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import fabula
from fabula.errors import FabulaError
from fabula.providers.base import SYSTEM_PATH, Host, ProgramHome

# fabula's own dependencies the program does not need: uv builds releases, which it never does
NOT_SHIPPED = {"uv"}
# what a build (a release's, the runtime's) may take from the operator's environment: how to
# reach the package index, nothing else (no SUDO_*, tokens, PATH entries)
PASSED_THROUGH = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                  "SSL_CERT_FILE", "SSL_CERT_DIR", "UV_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_DEFAULT_INDEX",
                  "UV_INDEX", "UV_NATIVE_TLS")
COMPLETE = ".complete"
# in the program's environment: the folder fabula was shipped to (the program runs on the platform host)
CONTROLLER_HOME = "FABULA_CONTROLLER_HOME"


def uv_binary() -> str:
    candidate = Path(sys.executable).parent / "uv"
    return str(candidate) if candidate.exists() else (shutil.which("uv") or "uv")


# -- the runtime: fabula and its dependencies, as a relocatable virtualenv --------------------------

def _package_dir() -> Path:
    return Path(fabula.__file__).parent


def _package_files() -> list[Path]:
    return sorted(p for p in _package_dir().rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def requirements() -> list[str]:
    """fabula's dependencies pinned to the versions installed here (what this fabula was tested with)."""
    pinned = []
    for requirement in importlib.metadata.requires("fabula") or []:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]
        if name.lower() not in NOT_SHIPPED:
            pinned.append(f"{name}=={importlib.metadata.version(name)}")
    return sorted(pinned)


def runtime_key(python: str) -> str:
    """The runtime's name: fabula's files, its dependencies and the interpreter, hashed (a changed
    fabula is shipped again; an unchanged one never is)."""
    digest = hashlib.sha256()
    for part in (python, *requirements()):
        digest.update(part.encode() + b"\0")
    root = _package_dir()
    for path in _package_files():
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _run(argv: list[str], what: str, env: dict[str, str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise FabulaError(f"building fabula's runtime for the platform host: {what} failed: "
                          f"{(proc.stderr or proc.stdout).strip()[-2000:]}",
                          "check that this machine reaches the package index (as it does for a release build)")
    return proc.stdout


def build_runtime(root: Path, python: str, uv: str | None = None) -> tuple[str, Path]:
    """(its key, its folder): the runtime under `root`/.runtime, built once per key."""
    key = runtime_key(python)
    runtimes = root / ".runtime"
    target = runtimes / key
    if (target / COMPLETE).exists():
        return key, target
    runtimes.mkdir(mode=0o700, parents=True, exist_ok=True)
    work = runtimes / f".{key}.{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    uv = uv or uv_binary()
    env = {"PATH": SYSTEM_PATH, "HOME": str(runtimes), "UV_CACHE_DIR": str(runtimes / "cache"),
           **{k: os.environ[k] for k in PASSED_THROUGH if k in os.environ}}
    try:
        _run([uv, "venv", "--quiet", "--relocatable", "--python", python, str(work)], "uv venv", env)
        interpreter = str(work / "bin" / "python")
        # wheels only: no build backend runs here, as root
        _run([uv, "pip", "install", "--quiet", "--only-binary", ":all:", "--python", interpreter, *requirements()],
             "uv pip install", env)
        purelib = _run([interpreter, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       "reading the virtualenv's site-packages", env).strip()
        shutil.copytree(_package_dir(), Path(purelib) / "fabula", ignore=shutil.ignore_patterns("__pycache__"))
        (work / COMPLETE).write_text(key + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.rename(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return key, target


# -- shipping it -----------------------------------------------------------------------------------

def ship(host: Host, *, root: Path, python: str, config: Path, project: str, env: str,
         files: dict[str, bytes] | None = None) -> ProgramHome:
    """fabula's runtime and `config` onto `host`, under its tree's `controller` folder (root's
    only), with `files` (name -> content, mode 0600) beside them and a state directory for the
    program's copy of environment `project`/`env`. A runtime shipped before is not sent again;
    older ones go."""
    key, runtime = build_runtime(root, python)
    home = host.path("controller")
    runtimes, state = home / "runtime", home / "state"
    shipped = runtimes / key
    host.make_dirs([home, runtimes, state, state / project, state / project / env], mode=0o700)
    if host.stat(shipped) is None:   # (a runtime is renamed there once whole)
        partial = runtimes / f"{key}.partial"
        host.check(["rm", "-rf", str(partial)])
        host.copy_tree(runtime, partial)
        host.check(["mv", "-T", str(partial), str(shipped)])
    # the runtimes of earlier fabulas: the program now runs this one
    host.check(["find", str(runtimes), "-mindepth", "1", "-maxdepth", "1", "!", "-name", key,
                "-exec", "rm", "-rf", "{}", "+"])
    host.put_file(home / "fabula.yml", config.read_bytes(), mode=0o600)
    for name, content in (files or {}).items():
        host.put_file(home / name, content, mode=0o600)
    return ProgramHome(str(shipped / "bin" / "python"), str(home / "fabula.yml"), str(state),
                       {CONTROLLER_HOME: str(home)})
