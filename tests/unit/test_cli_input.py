"""Bad input through the real CLI: one clear message, a non-zero exit, nothing created."""
from __future__ import annotations

import io
import json
import os
import socket

import pytest

from fabula.cli import main
from fabula.cli.runtime import CliEnvironment
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


def in_process(*argv: str, state_root, euid: int = 0, tty: bool = False) -> tuple[int, str, str]:
    """`fabula ARGV` run in this process with an environment of the test's: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), CliEnvironment(stdout=out, stderr=err, stdin_isatty=tty, euid=euid,
                                             state_root=state_root))
    return status, out.getvalue(), err.getvalue()


def test_without_root_the_local_provider_says_so(project, tmp_path, monkeypatch):
    # in-process, as an unprivileged user would see it
    monkeypatch.chdir(project)
    status, _, err = in_process("create", "testing", state_root=tmp_path / "state", euid=1000)
    assert status == 3
    assert "needs root" in err and "sudo" in err
    assert not (tmp_path / "state").exists()


def test_in_process_json_goes_to_the_given_stdout_and_usage_errors_exit_2(project, tmp_path, monkeypatch):
    monkeypatch.chdir(project)
    status, out, err = in_process("describe", "testing", "--json", state_root=tmp_path / "state")
    assert status == 0 and json.loads(out)["exists"] is False and json.loads(out)["environment"] == "testing"
    status, out, err = in_process("describe", state_root=tmp_path / "state")
    assert status == 2 and "Missing argument" in err and out == ""
    status, _, err = in_process("destroy", "testing", state_root=tmp_path / "state", tty=False)
    assert status == 1 and "--yes" in err


def test_destroy_without_a_terminal_asks_for_yes(project, tmp_path):
    result = run_fabula("destroy", "testing", cwd=project, state_dir=tmp_path / "state")
    assert result.returncode == 1 and "--yes" in result.stderr
