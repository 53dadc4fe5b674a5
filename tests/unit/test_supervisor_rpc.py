"""Supervisor against a real supervisord, on this machine: it is asked over its XML-RPC socket
(curl), not with supervisorctl, and must do what supervisorctl did: start it, add, replace and
remove programs, start, stop, restart and signal one, report states, shut it down."""
from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath

import pytest

from fabula.supervisor import Program, Supervisor, Unavailable
from fabula.testing import FakeHost, MachineHost, rpc_methods
from tests.helpers import wait_for

pytestmark = pytest.mark.skipif(shutil.which("supervisord") is None or os.geteuid() != 0,
                                reason="needs supervisord and root")


@pytest.fixture
def supervisor(tmp_path: Path):
    host = MachineHost("web1", "web", "127.0.0.1", root=str(tmp_path))
    supervisor = Supervisor(host)
    try:
        yield supervisor
    finally:
        supervisor.shutdown()


def pid_of(supervisor: Supervisor, name: str) -> int:
    return next(i["pid"] for i in supervisor.rpc("getAllProcessInfo") if i["name"] == name)


def test_programs_are_added_replaced_removed_started_stopped_and_signalled(supervisor, tmp_path):
    host = supervisor.host
    assert not supervisor.is_running() and supervisor.status() == {}
    supervisor.ensure_running()
    assert supervisor.is_running()
    mark = tmp_path / "usr1"
    trapper = Program("trapper", ["sh", "-c", f"trap 'touch {mark}' USR1; while :; do sleep 0.1; done"])
    started = supervisor.apply([Program("sleeper", ["sleep", "300"]), trapper])
    assert started == {"sleeper", "trapper"}
    supervisor.wait_running(["sleeper", "trapper"], timeout=20)
    assert not any("supervisorctl" in " ".join(argv) for argv in host.commands)

    first = pid_of(supervisor, "sleeper")
    supervisor.restart("sleeper")
    assert pid_of(supervisor, "sleeper") not in (0, first)
    supervisor.stop("sleeper")
    assert supervisor.status()["sleeper"] == "STOPPED"
    supervisor.stop("sleeper")     # not running: nothing to do, no error
    supervisor.start("sleeper")
    supervisor.start("sleeper")    # running: nothing to do, no error
    assert supervisor.status()["sleeper"] == "RUNNING"

    supervisor.signal("trapper", "USR1")
    wait_for(mark.exists, timeout=10, message="USR1 reached the program")

    # a changed program is replaced (a new process, its new command), an unchanged one left alone
    kept = pid_of(supervisor, "trapper")
    host.calls.clear()
    assert supervisor.apply([Program("sleeper", ["sleep", "301"]), trapper]) == {"sleeper"}
    assert rpc_methods(host).count("reloadConfig") == 1
    supervisor.wait_running(["sleeper"], timeout=20)
    assert b"301" in Path(f"/proc/{pid_of(supervisor, 'sleeper')}/cmdline").read_bytes()
    assert pid_of(supervisor, "trapper") == kept
    # a program whose file is gone is stopped and removed
    os.unlink(supervisor.programs_dir / "trapper.conf")
    supervisor.update()
    assert "trapper" not in supervisor.status()

    with pytest.raises(Exception, match="nosuch"):
        supervisor.start("nosuch")
    supervisor.shutdown()
    assert not supervisor.is_running()
    with pytest.raises(Unavailable):
        supervisor.rpc("getPID")


def test_the_socket_path_is_the_one_supervisord_conf_gives(tmp_path):
    host = FakeHost("web1", "web", "10.0.0.11", root=str(tmp_path))
    supervisor = Supervisor(host)
    supervisor.ensure_running()
    conf = host.text(supervisor.conf)
    assert f"file={supervisor.socket}\n" in conf and f"serverurl=unix://{supervisor.socket}\n" in conf
    assert PurePosixPath(supervisor.socket).parent == host.path("run")
