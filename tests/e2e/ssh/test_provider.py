"""What only the ssh provider has, on a lab of hosts (tests/sshlab.py): SSH admitted by every
host's firewall from fabula's machine, its program on the load balancer's host and
`admin_sources` only, a dead host recorded and its services started again when it is back, a
firewall that would lock the operator out rolled back, sysadmin users made and removed, a
second operator (another machine's state directory) sharing the first one's lock, state and
history, and `destroy` leaving the hosts reachable with nothing of fabula's left. The
architecture itself is the acceptance suite's (tests/acceptance, run for every provider)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fabula.sample import SampleEnvironment, fabula_argv, free_ports, local_keys, make_app_repo
from tests.helpers import wait_for
from tests.sshlab import ROLES, Lab, sh, ssh_keys, ssh_lab

pytestmark = pytest.mark.e2e

ENV = "prod"
ADMIN, OUTSIDER = len(ROLES), len(ROLES) + 1   # two more hosts of the lab, not in the inventory
SPARE = len(ROLES) + 2   # one the inventory gains, then loses


CREATED: list[str] = []   # the first create's steps


def reaches(lab: Lab, source: int, address: str, port: int) -> bool:
    """Whether host `source` of the lab opens a TCP connection to address:port."""
    result = sh("ip", "netns", "exec", lab.namespaces[source], "timeout", "3", "bash", "-c",
                f"exec 3<>/dev/tcp/{address}/{port}", check=False)
    return result.returncode == 0


def users_line(key: Path) -> str:
    """A sysadmin with a key of her own (not the lab's, which every host's sshd admits)."""
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fbalice", "-f", str(key))
    public = Path(f"{key}.pub").read_text().strip()
    return f'    users:\n      - {{name: fbalice, keys: ["{public}"]}}\n'


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[Lab, SampleEnvironment]]:
    # the hosts reach the package index, as real ones do: the worker host builds the releases
    with ssh_lab(len(ROLES) + 3, outside=True) as lab:
        base = Path(tempfile.mkdtemp(prefix="fabula-ssh-", dir="/var/tmp"))
        base.chmod(0o755)
        keys = (ssh_keys(lab, 8443, 8080, build="worker") + f"    admin_sources: [{lab.address(ADMIN)}/32]\n"
                + users_line(base / "alice"))
        app = make_app_repo(base / "app", f"ssh-{os.urandom(3).hex()}", ENV, keys, provider="ssh", servers=None)
        env = SampleEnvironment(app, base / "state", ENV)
        try:
            created = env.fabula("create", ENV, timeout=900)
            assert created.returncode == 0, f"create failed:\n{created.stdout}\n{created.stderr}"
            CREATED.append(created.stderr)   # the steps; stdout is what `describe` shows
            yield lab, env
        finally:
            env.fabula("destroy", ENV, "--yes", timeout=300)
            shutil.rmtree(base, ignore_errors=True)


def test_ssh_is_admitted_from_fabulas_machine_and_admin_sources_only(world):
    lab, env = world
    for i in range(len(ROLES)):
        address = lab.address(i)
        with socket.create_connection((address, 22), timeout=5) as conn:   # this machine: fabula's
            assert conn.recv(8).startswith(b"SSH-2.0")
        assert reaches(lab, ADMIN, address, 22), f"admin_sources cannot reach ssh on {address}"
        assert not reaches(lab, OUTSIDER, address, 22), f"an outsider reaches ssh on {address}"
    # and the hosts of the environment do not reach each other's SSH, but for the load balancer's
    # host, where fabula's program watches them
    assert not reaches(lab, 1, lab.address(5), 22)
    assert reaches(lab, 0, lab.address(5), 22)
    # the load balancer's ports are open to anyone, the web servers' 443 to it only
    assert reaches(lab, OUTSIDER, lab.address(0), 8443)
    assert not reaches(lab, OUTSIDER, lab.address(1), 443)


def test_the_worker_host_builds_the_release_and_keeps_only_its_wheel_cache(world):
    lab, env = world
    assert f"on worker1 ({lab.address(3)}): ssh.build is worker" in CREATED[0]
    listed = env.fabula("release", "list", ENV, "--json")
    [release] = [r for r in json.loads(listed.stdout)["releases"] if r["group"]]
    assert release["built_on"] == "worker1"
    # the virtualenv built there runs the app on the web hosts
    served = httpx.get(env.url + "/api/info", verify=False, timeout=10).json()
    assert served["release"] == release["id"]
    # the build ran as the environment's app user there and left only its wheel cache; uv is
    # root's, out of the app user's reach (the lab shares this disk)
    tree = Path("/srv/fabula", env.describe()["project"], ENV, "worker1")
    assert [p.name for p in (tree / ".build").iterdir()] == ["cache"]
    assert (tree / ".build").owner() == (tree / ".build" / "cache").owner() != "root"
    assert (tree / "build-tools" / "uv" / "bin" / "uv").owner() == "root"
    assert not list((tree / "tmp").glob("build-*"))


def test_the_programs_key_logs_in_from_the_load_balancers_host_only(world):
    """fabula's program on the load balancer's host reaches the hosts with the environment's own
    key, which no other address may use (admin_sources reach SSH, but not with it)."""
    lab, env = world
    key = env.state_dir / env.describe()["project"] / ENV / "secrets" / "ssh_ed25519"

    def logs_in(source: int) -> bool:
        return sh("ip", "netns", "exec", lab.namespaces[source], "ssh", "-i", str(key), "-o", "BatchMode=yes",
                  "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                  "-o", "ConnectTimeout=5", f"root@{lab.address(5)}", "true", check=False).returncode == 0
    assert logs_in(0)
    assert not logs_in(ADMIN)


def test_a_sysadmin_logs_in_with_her_key_and_has_passwordless_sudo(world):
    lab, env = world
    alice = Path(env.app_dir.parent / "alice")
    result = sh("ssh", "-i", str(alice), "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={lab.known_hosts}",
                "-o", "BatchMode=yes", f"fbalice@{lab.address(3)}", "sudo", "-n", "id", "-un", check=False)
    assert result.returncode == 0 and result.stdout.strip() == "root", result.stderr


def test_a_second_operator_sees_the_first_ones_lock_state_and_history(world):
    lab, env = world
    other = SampleEnvironment(env.app_dir, env.app_dir.parent / "other-operator", ENV)
    # nothing of this environment on the second machine yet: all of it comes from the hosts
    assert other.describe()["release"] == env.describe()["release"]
    history = other.fabula("history", ENV)
    assert history.returncode == 0 and "create" in history.stdout
    holder = subprocess.Popen(
        [*fabula_argv(), "manage", ENV, "--", "shell", "-c", "import time; time.sleep(25)"],
        cwd=env.app_dir, env={**os.environ, "FABULA_STATE_DIR": str(env.state_dir)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        lock = wait_for(lambda: other.describe().get("lock"), timeout=60, message="the lock seen by the other")
        assert lock["action"] == "manage" and lock["shared"]
        refused = other.fabula("maintenance", ENV, "on")
        assert refused.returncode != 0 and "locked by" in refused.stderr and "manage" in refused.stderr
    finally:
        holder.wait(timeout=120)
    assert holder.returncode == 0
    # once it ended, the lock is gone for both, and the second operator's change goes through
    assert other.describe().get("lock") is None
    assert other.fabula("maintenance", ENV, "off").returncode == 0
    assert "maintenance" in env.fabula("history", ENV).stdout


def test_a_killed_holder_lets_the_lock_go_and_is_named_by_the_next_command(world):
    lab, env = world
    other = SampleEnvironment(env.app_dir, env.app_dir.parent / "other-operator", ENV)
    holder = subprocess.Popen([*fabula_argv(), "manage", ENV, "--", "shell", "-c", "import time; time.sleep(60)"],
                              cwd=env.app_dir, env={**os.environ, "FABULA_STATE_DIR": str(env.state_dir)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: other.describe().get("lock"), timeout=60, message="the lock taken")
    finally:
        holder.kill()   # SIGKILL: no chance to give the lock back
        holder.wait(timeout=30)
    # the host lets the lock go with the killed fabula's connection
    after = wait_for(lambda: (r := other.fabula("maintenance", ENV, "off")).returncode == 0 and r, timeout=90,
                     interval=2, message="the lock let go")
    assert "cut off" in after.stderr and "fabula manage" in after.stderr


def test_a_firewall_that_would_lock_the_operator_out_is_rolled_back(world):
    lab, env = world
    script = f"""
import sys
from pathlib import Path
from fabula.environment.opening import open_environment
from fabula.output import Output
from fabula.roles import firewall_rules
ctx = open_environment(Path("fabula.yml"), "{ENV}", Output(quiet=True))
host = ctx.host("db1")
host.client_address = lambda: "192.0.2.1"   # the host would admit only this address's SSH
try:
    ctx.provider.apply_firewall(host, firewall_rules(ctx, ctx.state.servers["db1"]))
except Exception as exc:
    print("REFUSED", exc)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=env.app_dir, capture_output=True, text=True,
                            env={**os.environ, "FABULA_STATE_DIR": str(env.state_dir)}, timeout=120)
    assert "REFUSED" in result.stdout and "former rules are back" in result.stdout, result.stdout + result.stderr
    with socket.create_connection((lab.address(5), 22), timeout=5) as conn:
        assert conn.recv(8).startswith(b"SSH-2.0")
    assert env.exec("db1", "true").returncode == 0


def test_trust_records_the_hosts_keys_and_refuses_a_changed_one(world):
    lab, env = world
    app = env.app_dir.parent / "trusting-app"
    shutil.copytree(env.app_dir, app)
    known = env.app_dir.parent / "trusting-known-hosts"
    config = app / "fabula.yml"
    config.write_text(config.read_text().replace(f"known_hosts: {lab.known_hosts}", f"known_hosts: {known}"))
    operator = SampleEnvironment(app, env.app_dir.parent / "trusting-state", ENV)
    refused = operator.fabula("describe", ENV)
    assert refused.returncode != 0 and "fabula trust" in refused.stderr
    trusted = operator.fabula("trust", ENV)
    assert trusted.returncode == 0 and trusted.stdout.count("(recorded)") == len(ROLES), trusted.stdout
    inventory = {lab.address(i) for i in range(len(ROLES))}
    assert sorted(known.read_text().splitlines()) == sorted(
        line for line in lab.known_hosts.read_text().splitlines() if line.split(" ")[0] in inventory)
    again = operator.fabula("trust", ENV)
    assert again.stdout.count("(already known)") == len(ROLES)
    assert operator.describe()["release"] == env.describe()["release"]
    # a host whose key changed (reinstalled, or someone in between): refused, never replaced
    other_key = env.app_dir.parent / "other-host-key"
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key))
    lines = known.read_text().splitlines()
    lines[3] = " ".join(lines[3].split()[:1] + Path(f"{other_key}.pub").read_text().split()[:2])
    known.write_text("\n".join(lines) + "\n")
    changed = operator.fabula("trust", ENV)
    assert changed.returncode != 0 and "differs from the one recorded" in changed.stderr
    assert known.read_text().splitlines()[3] == lines[3]


def test_a_fixed_inventory_cannot_scale(world):
    _, env = world
    result = env.fabula("scale", ENV, "--desired", "3")
    assert result.returncode == 2 and "fixed inventory" in result.stderr and "fix:" in result.stderr


def test_a_dead_host_shows_in_describe_and_history_and_its_services_come_back_with_it(world):
    """The lab's hosts run no systemd: when a host comes back, only fabula's program on the load
    balancer's host starts its services again."""
    lab, env = world
    web2 = 2   # the lab's host of web2 (tests/sshlab.py's ROLES order)
    lab.kill_all(web2)   # sshd and every process of the host: as if it were switched off
    try:
        report = env.describe()
        dead = next(s for s in report["servers"] if s["name"] == "web2")
        assert dead["state"] == "unreachable" and "web2" in dead["error"]
        # the load balancer sends everything to web1 meanwhile
        wait_for(lambda: env.describe()["load_balancer"]["backends"].get("web2") == "DOWN", timeout=30,
                 message="web2 out of the load balancer")
        assert httpx.get(env.url + "/", verify=False, timeout=10).status_code == 200
        wait_for(lambda: host_events(env, "web2") == ["host down"], timeout=60, interval=1,
                 message="web2 recorded as down in the history")
    finally:
        lab.start_sshd(web2)   # the host is back, its services are not

    def serving_again() -> bool:
        back = next(s for s in env.describe()["servers"] if s["name"] == "web2")
        return back["state"] == "running" and back["lb"] == "UP"
    project = env.describe()["project"]
    log = Path("/srv/fabula", project, ENV, "lb1", "log", "autoscaler.log")   # (the lab's hosts share files)
    try:
        wait_for(serving_again, timeout=180, interval=2, message="web2's services started again by fabula's program")
    except AssertionError as exc:
        described = next(s for s in env.describe()["servers"] if s["name"] == "web2")
        raise AssertionError(f"{exc}\nweb2: {described}\nfabula's program:\n{log.read_text()[-3000:]}") from None
    assert host_events(env, "web2") == ["host down", "host back"]


def host_events(env: SampleEnvironment, name: str) -> list[str]:
    """What fabula's program recorded of host `name`, oldest first, as the hosts have it (read
    from a state directory of its own: this module's first one has a command cut off before,
    whose files it keeps until its next changing command)."""
    reader = SampleEnvironment(env.app_dir, env.app_dir.parent / "history-reader", ENV)
    ran = reader.fabula("history", ENV, "--json", "--last", "50")
    assert ran.returncode == 0, ran.stderr
    records = json.loads(ran.stdout)
    found = [r["details"]["decision"] for r in records
             if (r.get("details") or {}).get("host") == name and r.get("outcome") == "ok"]
    if not found:   # (shown by wait_for if it never comes)
        raise AssertionError("the history's last records: " + "; ".join(
            f"{r.get('command')} {r.get('outcome')} {r.get('details')}" for r in records[-4:]))
    return found


def test_a_host_taken_out_of_hosts_is_removed_by_the_next_create(world):
    lab, env = world
    config = env.app_dir / "fabula.yml"
    original = config.read_text()
    web3 = f"      web3: {{role: web, address: {lab.address(SPARE)}}}\n"
    config.write_text(original.replace("    hosts:\n", "    hosts:\n" + web3))
    try:
        created = env.fabula("create", ENV, timeout=600)
        assert created.returncode == 0, created.stderr
        assert env.describe()["load_balancer"]["backends"].get("web3") == "UP"
    finally:
        config.write_text(original)
    tree = Path("/srv/fabula", env.describe()["project"], ENV, "web3")
    assert tree.is_dir()
    created = env.fabula("create", ENV, timeout=600)
    assert created.returncode == 0, created.stderr
    assert "web3" in created.stderr and "no longer in fabula.yml" in created.stderr
    report = env.describe()
    assert "web3" not in {s["name"] for s in report["servers"]}
    assert "web3" not in report["load_balancer"]["backends"]
    assert httpx.get(env.url + "/", verify=False, timeout=10).status_code == 200
    # nothing of the server's is left on its host: no process, no firewall, no tree
    assert not lab.processes(f"{tree}/")
    assert "fabula" not in sh("ip", "netns", "exec", lab.namespaces[SPARE], "nft", "list", "tables").stdout
    assert not tree.exists()


def test_emergency_promote_when_the_primary_host_is_switched_off(world):
    lab, env = world
    db1 = list(ROLES).index("db1")
    with httpx.Client(verify=False, timeout=10) as http:
        assert http.post(env.url + "/api/entries", data={"text": "before the failover"}).status_code == 201
        lab.kill_all(db1)   # the primary's host, switched off
        try:
            promoted = env.fabula("db", "promote", ENV, timeout=300)
            assert promoted.returncode == 0, promoted.stderr
            assert "emergency" in promoted.stderr and "does not answer" in promoted.stderr
            roles = {s["name"]: s["role"] for s in env.servers()}
            assert (roles["db1"], roles["db2"]) == ("db-replica", "db-primary")
            # every web server writes to the new primary
            for _ in range(4):
                assert http.post(env.url + "/api/entries", data={"text": "after"}).status_code == 201
        finally:
            lab.start_sshd(db1)
    reset = env.fabula("db", "reset-replicas", ENV, timeout=600)
    assert reset.returncode == 0, reset.stderr
    replica = next(s for s in env.describe()["servers"] if s["name"] == "db1")
    assert replica["state"] == "running" and replica["replication"]["state"] == "streaming"
    assert env.query("SELECT count(*) FROM notes_entry WHERE text = 'after'", "db1") == "4"


def test_db_copy_brings_the_hosts_rows_into_a_local_environment(world):
    _, env = world
    config = env.app_dir / "fabula.yml"
    original = config.read_text()
    https, http = free_ports(2)
    config.write_text(original + "  staging:\n    provider: local\n"
                      "    servers: {web: 1, worker: 1, cache: 1, db-primary: 1, db-replica: 0}\n"
                      + local_keys(https, http))
    staging = SampleEnvironment(env.app_dir, env.state_dir, "staging")
    text = f"from-the-hosts-{os.urandom(4).hex()}"
    try:
        created = staging.fabula("create", "staging", timeout=900)
        assert created.returncode == 0, created.stderr
        posted = httpx.post(env.url + "/api/entries", data={"text": text}, verify=False, timeout=10)
        assert posted.status_code == 201
        copied = env.fabula("db", "copy", ENV, "staging", timeout=600)
        assert copied.returncode == 0, copied.stderr
        assert staging.query(f"SELECT count(*) FROM notes_entry WHERE text = '{text}'") == "1"
        # and served by the local environment's web tier
        served = httpx.get(f"{staging.url}/api/entries/{posted.json()['id']}", verify=False, timeout=10)
        assert served.json()["text"] == text
    finally:
        destroyed = staging.fabula("destroy", "staging", "--yes", timeout=300)
        config.write_text(original)
    assert destroyed.returncode == 0, destroyed.stderr


def test_backups_kept_on_a_host_are_listed_and_restored_from_there(world):
    lab, env = world
    config = env.app_dir / "fabula.yml"
    original = config.read_text()
    config.write_text(original.replace("    hosts:\n", "    db: {backups_host: db2}\n    hosts:\n"))
    folder = Path("/srv/fabula/backups", env.project, ENV)   # on db2 (the lab's hosts share one disk)
    text = f"backed-up-{os.urandom(4).hex()}"
    try:
        env.query(f"INSERT INTO notes_entry (text, server, created) VALUES ('{text}', 't', now())")
        made = env.fabula("db", "backup", ENV, timeout=300)
        assert made.returncode == 0, made.stderr
        listed = json.loads(env.fabula("db", "backups", ENV, "--json").stdout)
        assert len(listed) == 1 and listed[0]["path"].startswith("db2:")
        name = listed[0]["name"]
        assert {p.name for p in folder.iterdir()} == {name, name + ".json"}
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in folder.iterdir())
        assert not any(Path(env.state_dir).rglob("*.dump"))   # nothing kept on fabula's machine
        env.query(f"DELETE FROM notes_entry WHERE text = '{text}'")
        restored = env.fabula("db", "restore", ENV, name, timeout=600)
        assert restored.returncode == 0, restored.stderr
        assert env.query(f"SELECT count(*) FROM notes_entry WHERE text = '{text}'") == "1"
    finally:
        config.write_text(original)
        shutil.rmtree(folder.parent, ignore_errors=True)
        with contextlib.suppress(OSError):   # the hosts' backups folder, if no other environment's is there
            folder.parent.parent.rmdir()


def test_a_sysadmin_taken_out_of_the_file_is_removed_by_the_next_create(world):
    lab, env = world
    config = env.app_dir / "fabula.yml"
    text = config.read_text()
    config.write_text(text[:text.index("    users:\n")])
    created = env.fabula("create", ENV, timeout=600)
    assert created.returncode == 0, created.stderr
    assert sh("getent", "passwd", "fbalice", check=False).returncode != 0
    assert not any("fbalice" in p.name for p in Path("/etc/sudoers.d").iterdir())


def test_destroy_leaves_the_hosts_reachable_and_nothing_of_fabulas(world):
    lab, env = world
    project = json.loads(env.fabula("describe", ENV, "--json").stdout)["project"]
    destroyed = env.fabula("destroy", ENV, "--yes", timeout=300)
    assert destroyed.returncode == 0, destroyed.stderr
    for i in range(len(ROLES)):
        with socket.create_connection((lab.address(i), 22), timeout=5) as conn:
            assert conn.recv(8).startswith(b"SSH-2.0")
        tables = sh("ip", "netns", "exec", lab.namespaces[i], "nft", "list", "tables").stdout
        assert "fabula" not in tables, tables
    assert not Path("/srv/fabula", project).exists()
    assert sh("getent", "passwd", "fbalice", check=False).returncode != 0
    # the environment's own users (their comment names the project)
    assert not [line for line in Path("/etc/passwd").read_text().splitlines() if f"fabula {project}/" in line]
