"""Bad input through the real CLI: one clear message, a non-zero exit, nothing created."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import run_fabula
from tests.unit.test_config import VALID

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the local provider's checks run as root")


@pytest.fixture
def project(tmp_path):
    (tmp_path / "fabula.yml").write_text(VALID)
    return tmp_path


def test_invalid_config_exits_2_and_creates_nothing(project, tmp_path):
    (project / "fabula.yml").write_text(VALID.replace("web: 2", "web: 0"))
    state = tmp_path / "state"
    result = run_fabula("create", "testing", cwd=project, state_dir=state)
    assert result.returncode == 2
    assert "servers.web: at least 1 web server(s) are needed" in result.stderr
    assert "Traceback" not in result.stderr
    assert not state.exists()


def test_unknown_environment_exits_2(project, tmp_path):
    result = run_fabula("describe", "prod", cwd=project, state_dir=tmp_path / "state")
    assert result.returncode == 2 and "no environment 'prod'" in result.stderr


@needs_root
def test_a_port_already_taken_is_named_and_nothing_is_created(project, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (project / "fabula.yml").write_text(VALID.replace("https_port: 8443", f"https_port: {port}"))
        state = tmp_path / "state"
        result = run_fabula("create", "testing", cwd=project, state_dir=state)
    assert result.returncode == 2
    assert f"environments.testing.lb.https_port: 127.0.0.1:{port} is not available" in result.stderr
    assert not state.exists()


@needs_root
def test_without_root_the_local_provider_says_so():
    # a folder the unprivileged user can read (pytest's own tmp folders are root's alone)
    project = Path(tempfile.mkdtemp(prefix="fabula-unit-", dir="/var/tmp"))
    try:
        project.chmod(0o755)
        (project / "fabula.yml").write_text(VALID)
        env = {**os.environ, "FABULA_STATE_DIR": str(project / "state")}
        result = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                                 sys.executable, "-m", "fabula", "create", "testing"],
                                cwd=project, env=env, capture_output=True, text=True)
        assert result.returncode == 3, result.stderr
        assert "needs root" in result.stderr and "sudo" in result.stderr
        assert not (project / "state").exists()
    finally:
        shutil.rmtree(project)


def test_destroy_without_a_terminal_asks_for_yes(project, tmp_path):
    result = run_fabula("destroy", "testing", cwd=project, state_dir=tmp_path / "state")
    assert result.returncode == 1 and "--yes" in result.stderr
