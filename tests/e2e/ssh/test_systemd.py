"""A host where systemd runs (a Debian 12 tree of its own, booted by systemd-nspawn in its
namespace: tests/sshlab.py): its server's supervisord runs under fabula's unit, the
distribution's own units of its services are masked, and after a power cut everything comes back
at boot by the unit alone (fabula's program, which also starts a returning host's services, is
kept from reaching it); `destroy` removes the unit."""
from __future__ import annotations

import subprocess
from collections.abc import Iterator

import httpx
import pytest

from fabula.sample import SampleEnvironment
from tests.helpers import wait_for
from tests.sshlab import ROLES, Lab, sample_environment, sh, ssh_lab

pytestmark = pytest.mark.e2e

ENV = "prod"
WEB2 = list(ROLES).index("web2")   # the host that boots systemd
LB = list(ROLES).index("lb1")


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[Lab, SampleEnvironment]]:
    # the systemd host installs its packages from Debian's mirror, as a real one does
    with ssh_lab(len(ROLES), outside=True, systemd=(WEB2,)) as lab, sample_environment(lab, "sd", ENV) as env:
        created = env.fabula("create", ENV, timeout=900)
        assert created.returncode == 0, f"create failed:\n{created.stdout}\n{created.stderr}"
        yield lab, env


def unit_of(lab: Lab) -> str:
    units = lab.on(WEB2, "systemctl", "list-unit-files", "--no-legend", "fabula-*").stdout.split()
    [unit] = [u for u in units if u.endswith("-web2.service")]
    return unit


def served_by(env: SampleEnvironment) -> set[str]:
    servers = set()
    with httpx.Client(verify=False, timeout=5) as http:
        for _ in range(10):
            response = http.get(env.url + "/api/info")
            if response.status_code == 200:
                servers.add(response.json()["server"])
    return servers


def test_the_servers_supervisord_runs_under_its_unit_and_the_distributions_units_are_masked(world):
    lab, env = world
    unit = unit_of(lab)
    assert lab.on(WEB2, "systemctl", "is-enabled", unit).stdout.strip() == "enabled"
    assert lab.on(WEB2, "systemctl", "is-active", unit).stdout.strip() == "active"
    main = lab.on(WEB2, "systemctl", "show", "-p", "MainPID", "--value", unit).stdout.strip()
    assert lab.on(WEB2, "cat", f"/proc/{main}/comm").stdout.strip() == "supervisord"
    # the server's services are that supervisord's children, not started beside it
    children = lab.on(WEB2, "ps", "-o", "args=", "--ppid", main).stdout
    for service in ("nginx: master", "gunicorn", "pgbouncer"):
        assert service in children, children
    for distributions in ("nginx.service", "pgbouncer.service"):
        state = lab.on(WEB2, "systemctl", "is-enabled", distributions, check=False).stdout.strip()
        assert state == "masked", f"{distributions} is {state}"
    assert "web2" in served_by(env)


def test_after_a_power_cut_the_unit_alone_brings_the_host_back_into_service(world):
    lab, env = world
    # fabula's program on the load balancer's host starts a returning host's services too: kept
    # from reaching web2's SSH, it leaves that to the unit
    block = f"fbsd-{lab.tag}"
    subprocess.run(["ip", "netns", "exec", lab.namespaces[LB], "nft", "-f", "-"], check=True, text=True,
                   input=f"table inet {block} {{\n chain output {{\n  type filter hook output priority -10;\n"
                         f"  ip daddr {lab.address(WEB2)} tcp dport 22 drop\n }}\n}}\n")
    try:
        lab.kill_all(WEB2)   # the power cut: every process of the host (and, at boot, its nftables)
        wait_for(lambda: "web2" not in served_by(env), 60, message="the load balancer taking web2 out")
        lab.boot(WEB2)
        wait_for(lambda: "web2" in served_by(env), 120, interval=1, message="web2 serving again after its boot")
        # its firewall came back with it: the unit loads it before supervisord starts
        assert "table inet fabula-" in sh("ip", "netns", "exec", lab.namespaces[WEB2], "nft", "list", "tables").stdout
        assert lab.on(WEB2, "systemctl", "is-active", unit_of(lab)).stdout.strip() == "active"
    finally:
        sh("ip", "netns", "exec", lab.namespaces[LB], "nft", "delete", "table", "inet", block, check=False)


def test_destroy_removes_the_unit_and_leaves_the_host_reachable(world):
    lab, env = world
    destroyed = env.fabula("destroy", ENV, "--yes", timeout=300)
    assert destroyed.returncode == 0, destroyed.stderr
    # (systemctl exits 1 when no unit matches)
    units = lab.on(WEB2, "systemctl", "list-units", "--all", "--no-legend", "fabula-*", check=False).stdout
    assert "web2" not in units, units
    assert "web2" not in lab.on(WEB2, "systemctl", "list-unit-files", "--no-legend", "fabula-*", check=False).stdout
    assert not list(lab.roots[WEB2].joinpath("etc", "systemd", "system").glob("fabula-*"))
    assert lab.accepts(WEB2)
