"""Hosts for the ssh tests (the transport's, the ssh provider's, the acceptance suite's with
`provider: ssh`): network namespaces on a bridge of their own, each running
its own sshd (`ip netns exec NS /usr/sbin/sshd -D -e -f CONFIG`) with its own host key, and one
client key and known_hosts file for the test. Everything goes afterwards, also when a test fails."""
from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fabula.providers.ssh.transport import SshTarget
from fabula.sample import SampleEnvironment, make_app_repo
from tests.helpers import wait_for

HOSTS = 30
# root's home in a namespace is this machine's /root, whose .bashrc is not the tests' to change (and
# may be slow: pyenv's init takes 200 ms a command): sshd gives root's login shell a HOME of the
# lab's instead, with a quiet .bashrc on port 22; on AWKWARD_PORT, a host as awkward as real ones
# get: a noisy .bashrc, and fewer sessions per connection than the pool opens
AWKWARD_PORT = 2222
AWKWARD_SESSIONS = 3
SESSIONS = 30   # on port 22, more than the pool opens: the limit a test sees is the pool's own
NOISE = "noise from .bashrc"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def free_subnet() -> int:
    """x of a 10.251.x.0/24 no address or route of this machine is in."""
    taken = sh("ip", "-4", "-o", "addr").stdout + sh("ip", "-4", "route").stdout
    free = [x for x in range(1, 251) if f"10.251.{x}." not in taken]
    if not free:
        pytest.skip("no free 10.251.x.0/24 subnet")
    return secrets.choice(free)


@dataclass
class Lab:
    tag: str
    subnet: int
    tmp: Path
    key: Path
    known_hosts: Path
    namespaces: list[str] = field(default_factory=list)
    sshd: dict[str, subprocess.Popen] = field(default_factory=dict)   # or its systemd-nspawn
    roots: dict[int, Path] = field(default_factory=dict)   # the hosts that boot systemd: their trees

    @property
    def bridge(self) -> str:
        return f"fbssh-{self.tag}"

    def address(self, i: int) -> str:
        return f"10.251.{self.subnet}.{i + 2}"

    def target(self, i: int, **kwargs) -> SshTarget:
        return SshTarget(self.address(i), **{"key": self.key, "known_hosts": self.known_hosts, **kwargs})

    def config(self, i: int) -> Path:
        return self.tmp / f"host{i}" / "sshd_config"

    def start_sshd(self, i: int) -> None:
        if i in self.roots:
            return self.boot(i)
        ns = self.namespaces[i]
        log = (self.tmp / f"host{i}" / "sshd.log").open("ab")
        self.sshd[ns] = subprocess.Popen(["ip", "netns", "exec", ns, "/usr/sbin/sshd", "-D", "-e",
                                          "-f", str(self.config(i))], stdout=log, stderr=log)
        wait_for(lambda: self.accepts(i), 15, interval=0.05, message=f"sshd of {ns} accepting")

    def boot(self, i: int) -> None:
        """Host i powered on: systemd-nspawn boots its tree's systemd in its namespace (a fresh
        kernel's network state: no nftables table of a former boot), which starts its own sshd."""
        ns = self.namespaces[i]
        sh("ip", "netns", "exec", ns, "nft", "flush", "ruleset")
        log = (self.tmp / f"host{i}" / "console.log").open("ab")
        self.sshd[ns] = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", f"--network-namespace-path=/run/netns/{ns}",
             "--capability=CAP_NET_ADMIN",   # its own network: a real host's root has it (nftables)
             f"--machine=fbssh-{self.tag}-{i}", "--directory", str(self.roots[i]), "--boot", "--console=passive"],
            stdout=log, stderr=log)
        wait_for(lambda: self.accepts(i), 120, interval=0.2, message=f"host {i}'s systemd starting its sshd")

    def init(self, i: int) -> int:
        """The pid of host i's systemd (PID 1 in its tree), for nsenter."""
        for pid in sh("ip", "netns", "pids", self.namespaces[i]).stdout.split():
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                nspid = next(line for line in status.splitlines() if line.startswith("NSpid:")).split()
                if nspid[-1] == "1" and len(nspid) > 2:
                    return int(pid)
        raise AssertionError(f"host {i} runs no systemd")

    def on(self, i: int, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """argv as root on host i, which boots systemd: inside its tree and namespaces."""
        return sh("nsenter", "-t", str(self.init(i)), "-a", *argv, check=check)

    def accepts(self, i: int) -> bool:
        try:
            with socket.create_connection((self.address(i), 22), timeout=1) as conn:
                return conn.recv(8).startswith(b"SSH-2.0")
        except OSError:
            return False

    def kill_all(self, i: int) -> None:
        """sshd and every process in the namespace (its sessions, their commands)."""
        ns = self.namespaces[i]
        for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        if ns in self.sshd:
            process = self.sshd.pop(ns)
            process.kill()   # systemd-nspawn, whose machine is gone: it is not in the namespace
            process.wait(10)
        wait_for(lambda: not sh("ip", "netns", "pids", ns, check=False).stdout.split(), 10,
                 message=f"no process left in {ns}")

    def processes(self, needle: str, comm: str | None = None, at_once: bool = False) -> list[int]:
        """The machine's processes whose command line holds `needle` (and named `comm`); with
        `at_once`, only those that were all running at one moment."""
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if (proc.name.isdigit() and needle.encode() in (proc / "cmdline").read_bytes()
                        and comm in (None, (proc / "comm").read_text().strip())):
                    found.append(int(proc.name))
            except OSError:
                pass
        if not at_once:
            return found
        # /proc is read one process at a time, not at one instant: one that ended after it was read
        # and one that started before the scan's end would be counted together. Those still there
        # after the scan all ran at the same moment.
        return [pid for pid in found if _holds(Path(f"/proc/{pid}/cmdline"), needle)]


def _holds(cmdline: Path, needle: str) -> bool:
    try:
        return needle.encode() in cmdline.read_bytes()
    except OSError:
        return False


def _sshd_config(lab: Lab, i: int) -> str:
    hostdir = lab.tmp / f"host{i}"
    return "\n".join([
        f"ListenAddress {lab.address(i)}:22",
        f"ListenAddress {lab.address(i)}:{AWKWARD_PORT}",
        f"HostKey {hostdir / 'host_ed25519'}",
        f"PidFile {hostdir / 'sshd.pid'}",
        # the lab's key for every user, and a user's own (a sysadmin's, written by fabula)
        f"AuthorizedKeysFile {lab.tmp / 'authorized_keys'} .ssh/authorized_keys",
        "UsePAM no",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        f"MaxSessions {SESSIONS}",
        "StrictModes no",          # the lab's files are under /var/tmp, which any user may write
        "Subsystem sftp /usr/lib/openssh/sftp-server",   # as Debian's own configuration has it
        "Match LocalPort 22",
        f"    SetEnv HOME={lab.tmp / 'quiet-home'}",
        f"Match LocalPort {AWKWARD_PORT}",
        f"    SetEnv HOME={lab.tmp / 'noisy-home'}",
        f"    MaxSessions {AWKWARD_SESSIONS}",
        ""])


@contextmanager
def _outside(lab: Lab) -> Iterator[None]:
    """The lab's hosts reach the outside world (the package index) through this machine: a
    default route to the bridge's address, masqueraded, as a host behind a NAT gateway."""
    table = f"fbssh-{lab.tag}"
    subnet = f"10.251.{lab.subnet}.0/24"
    forwarding = Path("/proc/sys/net/ipv4/ip_forward")
    before = forwarding.read_text().strip()
    ruleset = (f"table ip {table} {{\n"
               f"  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n"
               f"    ip saddr {subnet} oifname != \"{lab.bridge}\" masquerade\n  }}\n}}\n")
    subprocess.run(["nft", "-f", "-"], input=ruleset, text=True, check=True)
    try:
        forwarding.write_text("1")
        for ns in lab.namespaces:
            sh("ip", "-n", ns, "route", "add", "default", "via", f"10.251.{lab.subnet}.1")
        yield
    finally:
        forwarding.write_text(before)
        sh("nft", "delete", "table", "ip", table, check=False)


# a Debian 12 host as systemd-nspawn boots it: systemd, sshd, and what fabula's preparation needs
# to begin (the rest it installs itself, from Debian's mirror through the lab's NAT)
ROOT_PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "ca-certificates")
MIRROR = "http://deb.debian.org/debian"


def debian_tree(lab: Lab, i: int) -> Path:
    """Host i's own Debian 12 tree (debootstrap), its sshd with the lab's host key and key."""
    if not shutil.which("systemd-nspawn") or not shutil.which("debootstrap"):
        pytest.skip("systemd-container and debootstrap are not installed (make setup)")
    root = lab.tmp / f"root{i}"
    made = sh("debootstrap", "--variant=minbase", f"--include={','.join(ROOT_PACKAGES)}", "bookworm", str(root),
              MIRROR, check=False)
    if made.returncode != 0:
        raise AssertionError(f"debootstrap failed:\n{made.stdout[-2000:]}\n{made.stderr[-2000:]}")
    for old in (root / "etc" / "ssh").glob("ssh_host_*"):
        old.unlink()
    hostdir = lab.tmp / f"host{i}"
    for suffix in ("", ".pub"):
        shutil.copy(hostdir / f"host_ed25519{suffix}", root / "etc" / "ssh" / f"ssh_host_ed25519_key{suffix}")
    (root / "root" / ".ssh").mkdir(mode=0o700, exist_ok=True)
    shutil.copy(f"{lab.key}.pub", root / "root" / ".ssh" / "authorized_keys")
    (root / "etc" / "hostname").write_text(f"host{i}\n")
    return root


@contextmanager
def ssh_lab(count: int, outside: bool = False, systemd: tuple[int, ...] = ()) -> Iterator[Lab]:
    """`count` hosts; `outside`: they reach the outside world too (see _outside); the hosts of
    `systemd` boot a Debian 12 tree of their own with systemd (debian_tree), the others run an
    sshd of the lab's on this machine's tree."""
    if os.geteuid() != 0:
        pytest.skip("the ssh transport's end-to-end tests need root (network namespaces)")
    if not Path("/usr/sbin/sshd").exists():
        pytest.skip("openssh-server is not installed (make setup)")
    tag = secrets.token_hex(3)
    tmp = Path(tempfile.mkdtemp(prefix=f"fbssh-{tag}-", dir="/var/tmp"))
    lab = Lab(tag, free_subnet(), tmp, tmp / "client", tmp / "known_hosts")
    try:
        tmp.chmod(0o755)
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"fbssh-{tag}", "-f", str(lab.key))
        shutil.copy(f"{lab.key}.pub", tmp / "authorized_keys")
        for home, rc in (("quiet-home", ""),
                         # to stdout and stderr, the first without a final newline: the worst case
                         ("noisy-home", f"printf '{NOISE}'; echo '{NOISE}' >&2\n")):
            (tmp / home).mkdir()
            (tmp / home / ".bashrc").write_text(rc)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        sh("ip", "link", "add", lab.bridge, "type", "bridge")
        gateway = ipaddress.ip_interface(f"10.251.{lab.subnet}.1/24")
        sh("ip", "addr", "add", str(gateway), "dev", lab.bridge)
        sh("ip", "link", "set", lab.bridge, "up")
        known = []
        for i in range(count):
            ns = f"fbssh-t{tag}-{i}"
            lab.namespaces.append(ns)
            sh("ip", "netns", "add", ns)
            veth = f"fbs{tag}h{i}"
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", veth, "master", lab.bridge, "up")
            sh("ip", "-n", ns, "addr", "add", f"{lab.address(i)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            hostdir = tmp / f"host{i}"
            hostdir.mkdir()
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostdir / "host_ed25519"))
            lab.config(i).write_text(_sshd_config(lab, i))
            public = (hostdir / "host_ed25519.pub").read_text().split()[:2]
            known += [f"{lab.address(i)} {' '.join(public)}",
                      f"[{lab.address(i)}]:{AWKWARD_PORT} {' '.join(public)}"]
        lab.known_hosts.write_text("\n".join(known) + "\n")
        for i in systemd:
            lab.roots[i] = debian_tree(lab, i)
        with _outside(lab) if outside else nullcontext():
            for i in range(count):
                lab.start_sshd(i)
            yield lab
    finally:
        for i, ns in enumerate(lab.namespaces):
            try:
                lab.kill_all(i)
            finally:   # a namespace's failure leaves the others' cleanup to run
                sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", lab.bridge, check=False)
        for i, root in lab.roots.items():   # what systemd-nspawn leaves of a machine: a folder, a lock
            shutil.rmtree(f"/run/systemd/nspawn/propagate/fbssh-{tag}-{i}", ignore_errors=True)
            with contextlib.suppress(OSError):
                tree = root.stat()
                Path(f"/run/systemd/nspawn/locks/inode-{tree.st_dev}:{tree.st_ino}").unlink()
        shutil.rmtree(tmp, ignore_errors=True)


# the 7 hosts of an ssh environment, in the lab's host order
ROLES = {"lb1": "lb", "web1": "web", "web2": "web", "worker1": "worker", "cache1": "cache", "db1": "db-primary",
         "db2": "db-replica"}


def ssh_keys(lab: Lab, https_port: int, http_port: int, hosts: dict[str, str] = ROLES, first: int = 0,
             build: str = "auto") -> str:
    """An ssh environment's keys as fabula.yml lines: the lab's hosts from `first` on, with `hosts`'
    names and roles, reached with the lab's key and known_hosts file; releases built as `build` says."""
    lines = [f"    ssh: {{user: root, key: {lab.key}, known_hosts: {lab.known_hosts}, build: {build}}}",
             f"    lb: {{https_port: {https_port}, http_port: {http_port}}}", "    hosts:"]
    lines += [f"      {name}: {{role: {role}, address: {lab.address(first + i)}}}"
              for i, (name, role) in enumerate(hosts.items())]
    return "\n".join(lines) + "\n"


@contextmanager
def sample_environment(lab: Lab, project_prefix: str, env: str = "prod") -> Iterator[SampleEnvironment]:
    """The sample app in a throw-away folder, its environment `env` on the lab's 7 first hosts
    (ROLES); destroyed, and the folder removed, at the end. It is not created here."""
    base = Path(tempfile.mkdtemp(prefix="fabula-ssh-", dir="/var/tmp"))
    base.chmod(0o755)
    app = make_app_repo(base / "app", f"{project_prefix}-{secrets.token_hex(3)}", env, ssh_keys(lab, 8443, 8080),
                        provider="ssh", servers=None)
    environment = SampleEnvironment(app, base / "state", env)
    try:
        yield environment
    finally:
        environment.fabula("destroy", env, "--yes", timeout=600)
        shutil.rmtree(base, ignore_errors=True)
