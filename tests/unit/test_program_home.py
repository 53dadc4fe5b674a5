"""fabula shipped to a platform host that does not share this machine's files (program_home):
a runtime that runs fabula without this machine, sent once, with the environment's fabula.yml."""
from __future__ import annotations

import subprocess
from pathlib import Path, PurePosixPath

from fabula import program_home
from fabula.testing import FakeHost


def test_the_runtime_runs_this_fabula_isolated_from_this_machine(tmp_path):
    key, runtime = program_home.build_runtime(tmp_path, "/usr/bin/python3")
    ran = subprocess.run([str(runtime / "bin" / "python"), "-I", "-c",
                          "import fabula, fabula.cli, fabula.providers.aws, boto3; print(fabula.__file__)"],
                         capture_output=True, text=True, cwd="/")
    assert ran.returncode == 0, ran.stderr
    assert Path(ran.stdout.strip()).is_relative_to(runtime)   # its own copy, not this machine's
    # its dependencies at the versions this fabula runs with; uv (release builds) is not shipped
    pins = program_home.requirements()
    assert any(p.startswith("boto3==") for p in pins) and not any(p.startswith("uv==") for p in pins)
    assert program_home.build_runtime(tmp_path, "/usr/bin/python3") == (key, runtime)   # built once


def test_shipping_sends_the_runtime_once_and_the_config_as_roots_only(tmp_path):
    config = tmp_path / "fabula.yml"
    config.write_text("project: polls\n")
    host = FakeHost("worker1", "worker", "10.0.0.5")
    shipped = program_home.ship(host, root=tmp_path, python="/usr/bin/python3", config=config, project="p",
                                env="e", files={"ssh-key": b"KEY"})
    python, home = PurePosixPath(shipped.python), PurePosixPath(shipped.environment[program_home.CONTROLLER_HOME])
    assert home == host.path("controller") and python.parent.parent.parent == home / "runtime"
    assert len(host.copied) == 1
    assert host.text(home / "fabula.yml") == "project: polls\n"
    assert (host.files[home / "fabula.yml"].mode, host.files[home / "ssh-key"].mode) == (0o600, 0o600)
    assert host.stat(home).mode == 0o700
    program_home.ship(host, root=tmp_path, python="/usr/bin/python3", config=config, project="p", env="e")
    assert len(host.copied) == 1   # the same fabula: not sent again
    # the runtimes of other fabulas go
    assert host.ran("find", str(home / "runtime"), "-mindepth", "1", "-maxdepth", "1", "!", "-name",
                    python.parent.parent.name)


def test_the_shared_files_unpack_as_plain_files_inside_their_folder_only(tmp_path):
    """What fabula's program on Debian 12's Python (no tarfile filters) does in their place."""
    import io
    import tarfile

    import pytest

    from fabula.errors import FabulaError
    from fabula.providers.base import extract_plain

    def archive(*members: tarfile.TarInfo) -> tarfile.TarFile:
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w") as tar:
            for member in members:
                tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
        data.seek(0)
        return tarfile.open(fileobj=data)

    plain = tarfile.TarInfo("secrets/key")
    plain.size, plain.mode = 1, 0o4777
    extract_plain(archive(plain), tmp_path / "ok")
    assert (tmp_path / "ok" / "secrets" / "key").read_bytes() == b"x"
    assert (tmp_path / "ok" / "secrets" / "key").stat().st_mode & 0o7777 == 0o644   # no setuid, no write for all
    outside = tarfile.TarInfo("../outside")
    outside.size = 1
    link = tarfile.TarInfo("state.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    for bad in (outside, link):
        with pytest.raises(FabulaError, match="not a plain file"):
            extract_plain(archive(bad), tmp_path / "bad")
    assert not (tmp_path / "outside").exists() and not (tmp_path / "bad").exists()
