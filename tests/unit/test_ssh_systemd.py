"""The ssh provider's hosts where systemd runs: each server's supervisord runs under a unit of its
own (started, and stopped, through systemctl; started again if it dies, and at boot); where systemd
does not run, fabula starts and stops supervisord itself and calls no systemctl. The hosts are
FakeHosts (the provider's SSH pool is replaced), and their supervisord a small simulation."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

import fabula.providers.ssh as ssh
from fabula import supervisor as supervisor_module
from fabula.accounts import Accounts
from fabula.config import load_config
from fabula.errors import FabulaError
from fabula.providers.base import Result
from fabula.providers.ssh import scripts
from fabula.providers.ssh.preparation import UNIT_DIR, Preparation
from fabula.state import EnvPaths, EnvState, ServerRecord
from fabula.supervisor import Supervisor
from fabula.testing import FakeHost, rpc_methods, rpc_request
from tests.unit.test_config import write
from tests.unit.test_config_ssh import SSH


class FakePool:
    """The provider's SshPool: one FakeHost per server, answering FACTS with `systemd`."""

    def __init__(self, systemd: bool):
        self.systemd = systemd
        self.hosts: dict[str, FakeHost] = {}

    def __call__(self, **_kwargs) -> FakePool:   # stands for the class: SshPool() makes it
        return self

    def host(self, name, role, target, root, accounts=None) -> FakeHost:
        if name not in self.hosts:
            host = FakeHost(name, role, target.address, root=str(PurePosixPath(root).parent), accounts=accounts)
            facts = f"debian 12 amd64 3.11 {'yes' if self.systemd else 'no'}\n"
            host.answer(["sh", "-c", scripts.FACTS], Result(0, facts, ""))
            self.hosts[name] = host
        return self.hosts[name]

    def close(self) -> None:
        pass


class Supervisord:
    """A host's supervisord as supervisorctl and the commands that start and stop it see it:
    `up` it answers; `late` answers after a start that it does not answer yet (systemd returns
    before supervisord listens); `conf_at_start` whether its configuration existed when started."""

    def __init__(self, host: FakeHost, unit: str, up: bool = False, late: int = 0):
        self.host, self.unit, self.up, self.late = host, unit, up, late
        self.conf_at_start: bool | None = None
        host.answer(["systemctl", "start", unit], self._start)
        host.answer(["systemctl", "stop", unit], self._stop)
        host.answer(["supervisord"], self._start)
        host.answer(["curl"], self._rpc)

    def _start(self, argv: list[str]) -> Result:
        self.conf_at_start = self.host.path("supervisor", "supervisord.conf") in self.host.files
        self.up = True
        return Result(0, "", "")

    def _stop(self, argv: list[str]) -> Result:
        self.up = False
        return Result(0, "", "")

    def _rpc(self, argv: list[str]) -> Result:
        call = self.host.calls[-1]   # this one: FakeHost records a call before answering it
        request = rpc_request(call)
        if request is None:
            return Result(0, "200", "")   # a health probe
        if not self.up or (request[0] == "getPID" and self.late > 0):
            self.late -= self.up
            return Result(7, "", "curl: (7) Couldn't connect to server")
        if request[0] == "shutdown":
            self.up = False
        return self.host._supervisord(call)


@pytest.fixture
def make_provider(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def make(systemd: bool) -> tuple[ssh.SshProvider, FakePool]:
        pool = FakePool(systemd)
        monkeypatch.setattr(ssh, "SshPool", pool)
        monkeypatch.setattr(ssh, "SshHost", FakeHost)   # the provider's isinstance checks
        monkeypatch.setattr(ssh.machine_users, "remove", lambda accounts, lock: [])   # this machine's users
        env = load_config(write(tmp_path, SSH)).environment("production")
        paths = EnvPaths(tmp_path / "state", "shop", "production")
        state = EnvState(project="shop", env="production")
        state.servers = {name: ServerRecord(name, h.role, h.address) for name, h in env.hosts.items()
                         if h.role != "lb"}
        return ssh.SshProvider(paths, env, state), pool
    return make


def unit_of(provider: ssh.SshProvider, host: FakeHost) -> str:
    return f"fabula-{provider.paths.tag}-{host.name}.service"


def index(host: FakeHost, *prefix: str) -> int:
    """Where the first command starting with `prefix` ran; a missing one fails the test."""
    found = [i for i, argv in enumerate(host.commands) if argv[:len(prefix)] == list(prefix)]
    assert found, f"{host.name} never ran {' '.join(prefix)}: {host.commands}"
    return found[0]


def systemctl_calls(pool: FakePool) -> list[list[str]]:
    return [argv for h in pool.hosts.values() for argv in h.commands if argv[0] == "systemctl"]


# -- where systemd runs ------------------------------------------------------------------------

def test_the_unit_runs_supervisord_in_the_foreground_restarts_it_and_is_enabled(make_provider):
    provider, pool = make_provider(systemd=True)
    host = provider.ensure_server("web1", "web")
    unit = unit_of(provider, host)
    text = pool.hosts["web1"].text(UNIT_DIR / unit)
    lines = text.splitlines()
    conf, firewall = host.path("supervisor", "supervisord.conf"), host.path("etc", "firewall.confirmed")
    assert f"ExecStart=/usr/bin/supervisord -n -c {conf}" in lines
    assert f"ExecStartPre=-/usr/sbin/nft -f {firewall}" in lines
    assert lines.index(f"ExecStartPre=-/usr/sbin/nft -f {firewall}") < lines.index(
        f"ExecStart=/usr/bin/supervisord -n -c {conf}")
    assert "Restart=always" in lines and "StartLimitIntervalSec=0" in lines
    restart_sec = [int(line.split("=", 1)[1]) for line in lines if line.startswith("RestartSec=")]
    assert restart_sec and 1 <= restart_sec[0] <= 10
    assert "KillMode=mixed" in lines and "WantedBy=multi-user.target" in lines
    assert "Environment=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 " \
           "HOME=/root" in lines
    web1 = pool.hosts["web1"]
    assert index(web1, "systemctl", "daemon-reload") < index(web1, "systemctl", "enable", unit)
    # started only once its supervisord's configuration is there (Supervisor.ensure_running)
    assert not web1.ran("systemctl", "start")
    # unchanged: nothing is reloaded again
    before = len(systemctl_calls(pool))
    provider.ensure_server("web1", "web")
    assert len(systemctl_calls(pool)) == before


def test_supervisord_is_started_through_its_unit_and_waited_for(make_provider):
    provider, pool = make_provider(systemd=True)
    provider.ensure_server("web1", "web")
    host = provider.host("web1")   # as a role gets it: a new host object of the provider's
    fake = pool.hosts["web1"]
    unit = unit_of(provider, fake)
    simulated = Supervisord(fake, unit, late=3)
    Supervisor(host).ensure_running()
    assert fake.ran("systemctl", "start", unit) and simulated.up
    assert not fake.ran("supervisord"), "systemd runs supervisord: fabula must not start one of its own"
    assert simulated.conf_at_start
    # it was asked again until it answered, before its programs were updated
    start = index(fake, "systemctl", "start", unit)
    pids = [i for i, method in enumerate(rpc_methods(fake)) if method == "getPID" and i > start]
    assert len(pids) == 4
    assert rpc_methods(fake).index("reloadConfig") > pids[-1]
    # running: not started again
    fake.calls.clear()
    Supervisor(provider.host("web1")).ensure_running()
    assert not fake.ran("systemctl", "start")


def test_a_supervisord_that_never_answers_is_an_error_naming_the_host(make_provider, monkeypatch):
    provider, pool = make_provider(systemd=True)
    provider.ensure_server("web1", "web")
    monkeypatch.setattr(supervisor_module, "START_WAIT", 0.3)
    Supervisord(pool.hosts["web1"], unit_of(provider, pool.hosts["web1"]), late=10 ** 6)
    with pytest.raises(FabulaError) as failed:
        Supervisor(provider.host("web1")).ensure_running()
    assert "web1" in str(failed.value) and "journalctl" in (failed.value.hint or "")


def test_the_unit_is_written_again_before_a_start_if_it_is_missing(make_provider):
    provider, pool = make_provider(systemd=True)
    provider.ensure_server("web1", "web")
    fake = pool.hosts["web1"]
    unit = unit_of(provider, fake)
    del fake.files[UNIT_DIR / unit]
    fake.calls.clear()
    Supervisord(fake, unit)
    Supervisor(provider.host("web1")).ensure_running()
    assert UNIT_DIR / unit in fake.files
    assert index(fake, "systemctl", "enable", unit) < index(fake, "systemctl", "start", unit)


def test_removing_a_server_stops_its_unit_before_anything_else_then_removes_it(make_provider):
    provider, pool = make_provider(systemd=True)
    provider.ensure_server("web1", "web")
    fake = pool.hosts["web1"]
    unit = unit_of(provider, fake)
    simulated = Supervisord(fake, unit, up=True)
    fake.calls.clear()
    provider.remove_server("web1")
    assert not simulated.up
    stop = index(fake, "systemctl", "stop", unit)
    # stopped through systemd (which would start a supervisord stopped any other way again) and
    # before STOP_SERVER kills what is left and the tree goes
    assert stop < index(fake, "sh", "-c", scripts.STOP_SERVER)
    assert stop < index(fake, "systemctl", "disable", unit)
    assert index(fake, "systemctl", "disable", unit) < index(fake, "rm", "-f", "--", str(UNIT_DIR / unit))
    assert index(fake, "rm", "-f", "--", str(UNIT_DIR / unit)) < index(fake, "systemctl", "daemon-reload")
    assert fake.ran("systemctl", "reset-failed", unit)
    assert "shutdown" not in rpc_methods(fake)


def test_destroy_stops_every_unit_the_load_balancers_first(make_provider):
    provider, pool = make_provider(systemd=True)
    servers = {name: provider.ensure_server(name, record.role) for name, record in provider.state.servers.items()}
    lb = provider.load_balancer.platform
    provider.preparation.make_tree(lb)   # what ensure_network does for its unit
    simulated = {h.name: Supervisord(pool.hosts[h.name], unit_of(provider, pool.hosts[h.name]), up=True)
                 for h in [lb, *servers.values()]}
    for fake in pool.hosts.values():
        fake.calls.clear()
    provider.destroy()
    lb_fake = pool.hosts[lb.name]
    lb_unit = unit_of(provider, lb_fake)
    # the autoscaler's supervisord stopped for good: a `supervisorctl shutdown` would have systemd
    # start it (and the autoscaler) again
    shutdowns = [i for i, method in enumerate(rpc_methods(lb_fake)) if method == "shutdown"]
    assert all(i > index(lb_fake, "systemctl", "stop", lb_unit) for i in shutdowns)
    for name, fake in pool.hosts.items():
        unit = unit_of(provider, fake)
        assert not simulated[name].up
        assert index(fake, "systemctl", "stop", unit) < index(fake, "sh", "-c", scripts.STOP_SERVER)
        assert fake.ran("systemctl", "disable", unit) and fake.ran("rm", "-f", "--", str(UNIT_DIR / unit))
        assert fake.ran("systemctl", "daemon-reload")


# -- where systemd does not run: as before, and no systemctl at all ------------------------------

def test_without_systemd_supervisord_is_started_and_stopped_directly(make_provider):
    provider, pool = make_provider(systemd=False)
    servers = {name: provider.ensure_server(name, record.role) for name, record in provider.state.servers.items()}
    provider.preparation.make_tree(provider.load_balancer.platform)
    fake = pool.hosts["web1"]
    simulated = Supervisord(fake, unit_of(provider, fake))
    Supervisor(provider.host("web1")).ensure_running()
    assert fake.ran("supervisord", "-c", str(servers["web1"].path("supervisor", "supervisord.conf")))
    assert simulated.up and simulated.conf_at_start
    provider.remove_server("web1")
    provider.state.servers.pop("web1")
    provider.destroy()
    assert systemctl_calls(pool) == []
    assert not any(path.is_relative_to(UNIT_DIR) for h in pool.hosts.values() for path in h.files)


def test_a_host_without_a_way_of_its_own_starts_supervisord_directly():
    host = FakeHost("web1", "web", "10.0.0.11")   # e.g. the local provider's hosts
    simulated = Supervisord(host, "none")
    assert host.start_supervisord is None
    Supervisor(host).ensure_running()
    assert host.ran("supervisord", "-c", str(host.path("supervisor", "supervisord.conf")))
    assert not host.ran("systemctl") and simulated.up


# -- the unit file ----------------------------------------------------------------------------

def preparation(firewall: bool = True, project: str = "shop", env: str = "production") -> Preparation:
    return Preparation(project, env, "0a1b2c3d", Accounts("0a1b2c3d"), firewall=firewall)


@pytest.mark.parametrize("bad", ["web1\nExecStartPre=/bin/sh -c evil", "web 1", "web%n", "web$HOME",
                                 'web"1', "web\\1", "web;1", "web\r1"])
def test_a_value_that_could_change_the_units_structure_is_refused(bad: str):
    host = FakeHost(bad, "web", "10.0.0.11", root="/srv/fabula/shop/production")
    with pytest.raises(ValueError):
        preparation().unit_text(host)
    with pytest.raises(ValueError):
        preparation().unit_name(host)
    with pytest.raises(ValueError):
        preparation(project="shop\n[Service]").unit_text(FakeHost("web1", "web", "10.0.0.11"))
    # a root whose path has a space (names are validated, paths follow from them)
    with pytest.raises(ValueError):
        preparation().unit_text(FakeHost("web1", "web", "10.0.0.11", root="/srv/fa bula/shop/production"))


def test_the_aws_unit_loads_no_firewall():
    host = FakeHost("worker1", "worker", "10.0.1.5", root="/srv/fabula/shop/production")
    assert "nft" not in preparation(firewall=False).unit_text(host)


@pytest.mark.parametrize("firewall", [True, False])
def test_systemd_analyze_verifies_the_unit(tmp_path: Path, firewall: bool):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here")
    # it checks that ExecStart's programs exist: those of a Debian host with fabula's packages
    needed = ["/usr/bin/supervisord"] + (["/usr/sbin/nft"] if firewall else [])
    if not all(os.access(p, os.X_OK) for p in needed):
        pytest.skip(f"systemd-analyze checks that {' and '.join(needed)} exist; they do not here")
    prep = preparation(firewall)
    host = FakeHost("web1", "web", "10.0.0.11", root=str(prep.env_root))
    unit = tmp_path / prep.unit_name(host)
    unit.write_text(prep.unit_text(host))
    result = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    # a setting systemd does not understand is a warning ("..., ignoring") naming the file, not a failure
    about_it = [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line]
    assert result.returncode == 0 and about_it == [], result.stdout + result.stderr
