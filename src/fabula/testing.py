"""Fakes that implement the real interfaces, for unit tests without servers: a host that records
the commands run on it and keeps its files in memory, a load balancer, and a provider.

    host = FakeHost("cache1", "cache", "10.0.0.12")
    Cache().converge(ctx, host)
    assert host.files[host.path("etc", "redis", "redis.conf")].owner == host.accounts.cache
    assert "reloadConfig" in rpc_methods(host)

A command's result comes from the first of `host.answers` whose argv prefix matches, else from a
built-in answer for what fabula itself runs (supervisord's XML-RPC, health probes, readlink...), else
success with no output.
"""
from __future__ import annotations

import os
import re
import subprocess
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from fabula.accounts import Accounts
from fabula.providers.base import (
    SYSTEM_PATH,
    Backend,
    EgressRule,
    FileState,
    Host,
    IngressRule,
    LoadBalancer,
    Provider,
    Result,
)
from fabula.state import EnvState

Answer = Result | Callable[[list[str]], Result]


@dataclass
class FakeFile:
    data: bytes
    mode: int
    owner: str


@dataclass
class Call:
    argv: list[str]
    user: str | None
    env: dict[str, str] | None
    input: str | None


class FakeHost(Host):
    def __init__(self, name: str, role: str, address: str, root: str = "/srv/fabula/p/e",
                 accounts: Accounts | None = None):
        self.name, self.role, self.address = name, role, address
        self.root = PurePosixPath(root) / name
        self.accounts = accounts or Accounts("t3st")
        self.files: dict[PurePosixPath, FakeFile] = {}
        self.dirs: dict[PurePosixPath, FileState] = {}
        self.calls: list[Call] = []
        self.answers: list[tuple[list[str], Answer]] = []
        self.copied: list[tuple[Path, PurePosixPath]] = []
        self._links: dict[str, str] = {}  # symbolic links made with `ln -sfn`: path -> target
        self.supervisord_down = False   # after a shutdown, until `supervisord` starts it again

    # -- what a test looks at -------------------------------------------------------------
    @property
    def commands(self) -> list[list[str]]:
        return [c.argv for c in self.calls]

    def ran(self, *prefix: str) -> list[Call]:
        """The calls whose argv starts with `prefix`."""
        return [c for c in self.calls if c.argv[:len(prefix)] == list(prefix)]

    def text(self, path: PurePosixPath) -> str:
        return self.files[PurePosixPath(path)].data.decode()

    def answer(self, prefix: list[str], result: Answer) -> None:
        self.answers.append((prefix, result))

    # -- the transport ------------------------------------------------------------------
    def run(self, argv, *, user=None, env=None, input=None, timeout=120) -> Result:
        argv = [str(a) for a in argv]
        self.calls.append(Call(argv, user, env, input))
        for prefix, result in self.answers:
            if argv[:len(prefix)] == prefix:
                return result(argv) if callable(result) else result
        return self._builtin(argv)

    def interactive(self, argv, *, user=None, env=None) -> int:
        return self.run(argv, user=user, env=env).returncode

    def read(self, path) -> bytes | None:
        found = self.files.get(PurePosixPath(path))
        return found.data if found else None

    def write(self, path, data: bytes, *, mode: int, owner: str) -> None:
        self.files[PurePosixPath(path)] = FakeFile(data, mode, owner)

    def stat(self, path) -> FileState | None:
        path = PurePosixPath(path)
        if path in self.files:
            return FileState(self.files[path].mode, self.files[path].owner)
        return self.dirs.get(path)

    def copy_tree(self, local: Path, path) -> None:
        self.copied.append((Path(local), PurePosixPath(path)))
        self.dirs[PurePosixPath(path)] = FileState(0o755, "root")

    def fetch(self, path, local: Path) -> None:
        Path(local).write_bytes(self.read(path) or b"")

    def push(self, local: Path, path, *, mode=0o600, owner="root") -> None:
        self.write(path, Path(local).read_bytes(), mode=mode, owner=owner)

    # -- what fabula's own commands answer on a healthy server ---------------------------
    def _builtin(self, argv: list[str]) -> Result:
        if argv[:2] == ["sh", "-ec"] and "mkdir -p" in argv[2]:  # Host.make_dirs
            owner, mode = argv[4], int(argv[5], 8)
            for path in argv[6:]:
                self.dirs[PurePosixPath(path)] = FileState(mode, owner)
            return Result(0, "", "")
        if argv[0] == "supervisord":
            self.supervisord_down = False
        if argv[0] == "curl" and "--unix-socket" in argv:
            return self._supervisord(self.calls[-1])
        if argv[0] == "curl":
            return Result(0, "200", "")
        if argv[:2] == ["mv", "-T"]:
            source, target = PurePosixPath(argv[2]), PurePosixPath(argv[3])
            if source in self.dirs:
                self.dirs[target] = self.dirs.pop(source)
            if source in self.files:
                self.files[target] = self.files.pop(source)
            return Result(0, "", "")
        if argv[0] == "readlink":
            return Result(0, self._links.get(argv[1], ""), "")
        if argv[:2] == ["ln", "-sfn"]:
            self._links[argv[3]] = argv[2]
            return Result(0, "", "")
        return Result(0, "", "")

    def programs(self) -> dict[str, str]:
        """The supervisor programs written on this host: name -> its configuration."""
        found = {}
        for path, file in self.files.items():
            if path.parent.name == "programs" and path.suffix == ".conf":
                found[path.stem] = file.data.decode()
        return found

    def _supervisord(self, call: Call) -> Result:
        """supervisord's XML-RPC answer (Supervisor.rpc): every program written is running."""
        method, params = rpc_request(call) or ("", ())
        value: Any = True
        if self.supervisord_down:
            return Result(7, "", "curl: (7) Couldn't connect to server")
        if method == "shutdown":
            self.supervisord_down = True
        elif method == "getPID":
            value = 4242
        elif method == "getAllProcessInfo":
            value = [{"name": name, "group": name, "statename": "RUNNING", "description": f"pid 4{n}, uptime 0:00:05"}
                     for n, name in enumerate(sorted(self.programs()))]
        elif method == "reloadConfig":
            value = [[sorted(self.programs()), [], []]]
        return Result(0, xmlrpc.client.dumps((value,), methodresponse=True, allow_none=True), "")


def rpc_request(call: Call) -> tuple[str, tuple] | None:
    """The supervisord method (without `supervisor.`) and parameters of a command Supervisor.rpc
    ran, else None: what a test asks of a FakeHost's calls."""
    if call.argv[:1] != ["curl"] or "--unix-socket" not in call.argv or not call.input:
        return None
    params, method = xmlrpc.client.loads(call.input)
    return (method or "").removeprefix("supervisor."), params


def rpc_methods(host: FakeHost) -> list[str | None]:
    """Per command run on `host`, in order: the supervisord method it called, else None."""
    return [(rpc_request(c) or (None,))[0] for c in host.calls]


class MachineHost(FakeHost):
    """A FakeHost whose commands and files are this machine's own, run as the user running the
    tests (a command for another user is refused), each call still recorded: for code whose
    commands must really work (the hosts' shell scripts, supervisord)."""

    def run(self, argv, *, user=None, env=None, input=None, timeout=120) -> Result:
        assert user is None, "MachineHost runs commands as the tests' own user only"
        argv = [str(a) for a in argv]
        self.calls.append(Call(argv, user, env, input))
        proc = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout,
                              env={"PATH": SYSTEM_PATH})
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def read(self, path) -> bytes | None:
        return Path(path).read_bytes() if Path(path).exists() else None

    def write(self, path, data: bytes, *, mode: int, owner: str) -> None:
        Path(path).write_bytes(data)
        os.chmod(path, mode)

    def stat(self, path) -> FileState | None:
        return FileState(Path(path).stat().st_mode & 0o7777, "root") if Path(path).exists() else None

    def push(self, local: Path, path, *, mode=0o600, owner="root") -> None:
        self.write(path, Path(local).read_bytes(), mode=mode, owner=owner)

    def fetch(self, path, local: Path) -> None:
        Path(local).write_bytes(Path(path).read_bytes())


class FakeLoadBalancer(LoadBalancer):
    """Backends go UP as soon as they are added; drained ones leave at once."""

    def __init__(self, url: str = "https://127.0.0.1:8443/"):
        self.backends: list[Backend] = []
        self.drained: set[str] = set()
        self._url = url
        self.running = False

    def ensure(self, backends: list[Backend]) -> None:
        self.backends = list(backends)
        self.running = True

    def health(self) -> dict[str, str]:
        return {b.name: ("DRAIN" if b.name in self.drained else "UP") for b in self.backends}

    def drain(self, name: str) -> None:
        self.drained.add(name)

    def ready(self, name: str) -> None:
        """Back in service; one it has no backend for is added (as an ALB registers an instance)."""
        self.drained.discard(name)
        if name not in {b.name for b in self.backends}:
            self.backends.append(Backend(name, "", 443))

    def active_requests(self, name: str) -> int:
        return 0

    def stats(self) -> dict[str, dict[str, str]]:
        return {b.name: {"scur": "0", "req_rate": "0", "status": self.health()[b.name]} for b in self.backends}

    def is_running(self) -> bool:
        return self.running

    def url(self) -> str:
        return self._url


@dataclass
class FakeProvider(Provider):
    """Servers are FakeHosts with addresses 10.0.0.10 and up; firewalls are recorded per server."""

    state: EnvState = field(default_factory=lambda: EnvState("fake", "fake"))
    name: str = "fake"
    load_balancer: LoadBalancer = field(default_factory=FakeLoadBalancer)
    hosts: dict[str, FakeHost] = field(default_factory=dict)
    firewalls: dict[str, list[IngressRule | EgressRule]] = field(default_factory=dict)
    accounts: Accounts = field(default_factory=lambda: Accounts("t3st"))
    platform: FakeHost | None = None
    prepared: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def check_prerequisites(self) -> None:
        return None

    def allocate_subnet(self) -> str:
        return "10.0.0.0/24"

    def ensure_network(self) -> None:
        return None

    def ensure_accounts(self) -> Accounts:
        return self.accounts

    def ensure_server(self, name: str, role: str) -> Host:
        record = self.state.servers[name]
        if not record.address:
            record.address = f"10.0.0.{10 + len([h for h in self.hosts])}"
        if name not in self.hosts:
            self.hosts[name] = FakeHost(name, role, record.address, accounts=self.accounts)
        return self.hosts[name]

    def host(self, name: str) -> Host:
        if name not in self.hosts:
            record = self.state.servers[name]
            self.hosts[name] = FakeHost(name, record.role, record.address, accounts=self.accounts)
        return self.hosts[name]

    def server_exists(self, name: str) -> bool:
        return name in self.hosts

    def list_servers(self) -> list[str]:
        return sorted(self.hosts)

    def prepare_host(self, host: Host, packages: tuple[str, ...]) -> None:
        self.prepared[host.name] = packages

    def platform_host(self) -> Host:
        if self.platform is None:
            self.platform = FakeHost("lb", "lb", "127.0.0.1", accounts=self.accounts)
        return self.platform

    def apply_firewall(self, host: Host, rules) -> bool:
        changed = self.firewalls.get(host.name) != list(rules)
        self.firewalls[host.name] = list(rules)
        return changed

    def remove_server(self, name: str, drained: bool = False) -> None:
        self.hosts.pop(name, None)

    def destroy(self) -> list[str]:
        removed = [f"server {n}" for n in self.hosts]
        self.hosts.clear()
        return removed


def ini_value(text: str, key: str) -> str | None:
    """`key = value` of an INI-like file (pgbouncer.ini, supervisor programs), or None."""
    found = re.search(rf"^{re.escape(key)}\s*=\s*(.*)$", text, re.M)
    return found.group(1).strip() if found else None


@dataclass
class FakeAccess:
    """How the aws provider reaches its instances, in tests: each is a FakeHost (kept per name,
    made again when its address changes: a new instance), and presents a host key of its own."""

    hosts: dict[str, FakeHost] = field(default_factory=dict)
    ssh_addresses: dict[str, str] = field(default_factory=dict)   # name -> where fabula would connect

    def host(self, name: str, role: str, ssh_address: str, address: str, root: PurePosixPath,
             accounts: Accounts) -> Host:
        host = self.hosts.get(name)
        if host is None or host.address != address:
            host = self.hosts[name] = FakeHost(name, role, address, root=str(PurePosixPath(root).parent),
                                               accounts=accounts)
        host.role = role
        self.ssh_addresses[name] = ssh_address
        return host

    def host_key(self, name: str, ssh_address: str) -> str:
        return f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA{ssh_address.replace('.', '')}"
