"""The local provider: each server is a Linux network namespace on a bridge of its environment,
with its own address, nftables firewall, private directory and supervisord."""
from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import shutil
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from fabula import machine_users as users
from fabula.accounts import Accounts
from fabula.addressing import address_index, server_addresses
from fabula.config import EnvironmentConfig
from fabula.errors import ConfigError, FabulaError, PermissionError_, PrerequisiteError
from fabula.providers.base import EgressRule, Host, IngressRule, Provider, poll, run_local
from fabula.providers.haproxy import HAProxyLoadBalancer
from fabula.providers.local import network
from fabula.providers.local.host import LocalHost
from fabula.state import EnvPaths, EnvState
from fabula.templates import render

AUTO_SUBNETS = ipaddress.ip_network("10.213.0.0/16")
# commands the local provider itself needs, and the Debian package that has each
TOOLS = {"ip": "iproute2", "nft": "nftables", "supervisord": "supervisor", "haproxy": "haproxy",
         "setpriv": "util-linux", "socat": "socat"}


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):  # gone meanwhile: ENOENT, or ESRCH while reading
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def kill_and_wait(pids: list[int], grace: float = 15) -> None:
    """TERM, then KILL what is still there after `grace` seconds (at once when 0); wait until
    all are gone."""
    if grace > 0:
        _signal_all(pids, signal.SIGTERM)
        poll(lambda: not _alive(pids), grace, interval=0.1)
    _signal_all(_alive(pids), signal.SIGKILL)
    poll(lambda: not _alive(pids), 10, interval=0.05)


def processes_mentioning(text: str) -> list[int]:
    """Processes whose command line names `text` (an environment's directory), in any namespace."""
    needle = text.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


class LocalProvider(Provider):
    name = "local"
    load_balancer: HAProxyLoadBalancer  # its own: the platform's host, and `stop` on destroy

    def __init__(self, paths: EnvPaths, env: EnvironmentConfig, state: EnvState, euid: int = 0):
        self.paths, self.env, self.state = paths, env, state
        self.euid = euid  # who runs fabula: the local provider needs root
        self.bridge = f"fb{paths.tag}"
        self._packages_seen: set[str] = set()  # every server shares this machine's packages
        # the load balancer's own supervisor runs in the machine's namespace
        platform = LocalHost("lb", "lb", str(env.local.bind), paths.lb_dir, netns=None)
        self.load_balancer = HAProxyLoadBalancer(platform, env.lb, paths.pki_dir / "ca.pem", paths.project,
                                                 paths.env, public_address=str(env.local.bind),
                                                 bind=str(env.local.bind), domains=env.domains)

    # -- naming ---------------------------------------------------------------------------
    def netns(self, server: str) -> str:
        return f"fab.{self.paths.project}.{self.paths.env}.{server}"

    @property
    def subnet(self) -> ipaddress.IPv4Network | None:
        return ipaddress.IPv4Network(self.state.subnet) if self.state.subnet else None

    @property
    def gateway(self) -> str | None:
        return str(next(self.subnet.hosts())) if self.subnet else None

    def require_subnet(self) -> ipaddress.IPv4Network:
        """The environment's subnet; an error if none is allocated yet."""
        subnet = self.subnet
        if subnet is None:
            raise FabulaError(f"environment {self.paths.env} has no subnet yet",
                              f"run `fabula create {self.paths.env}`")
        return subnet

    def require_gateway(self) -> str:
        """The machine's address on the environment's bridge; an error if there is no subnet yet."""
        return str(next(self.require_subnet().hosts()))

    # -- checks ---------------------------------------------------------------------------
    def check_prerequisites(self) -> None:
        if self.euid != 0:
            raise PermissionError_("the local provider needs root: it makes network namespaces, "
                                   "a bridge and firewall tables", "run fabula with sudo (or as root)")
        missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
        if missing:
            raise PrerequisiteError(f"missing Debian package(s): {', '.join(missing)}",
                                    f"run `make setup` or `apt-get install {' '.join(missing)}`")

    def check_can_create(self, config_path: str) -> None:
        """HAProxy binds the load balancer's ports on this machine: they must be free (unless
        it is ours that holds them)."""
        lb, bind = self.env.lb, self.env.local.bind
        if self.load_balancer.is_running():
            return
        for key, port in (("https_port", lb.https_port), ("http_port", lb.http_port)):
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((str(bind), port))
                except OSError as exc:
                    raise ConfigError(f"{config_path}: environments.{self.paths.env}.lb.{key}: "
                                      f"{bind}:{port} is not available ({exc.strerror})",
                                      "choose a free port, or stop what uses it "
                                      f"(`ss -ltnp 'sport = :{port}'` shows it)") from None

    def allocate_subnet(self) -> str:
        lock_path = self.paths.root / ".subnets.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # the machine's routes (but this environment's own bridge: a crashed create made it),
            # and the subnets other environments have claimed
            taken = [(net, f"the route to {net} (dev {dev})")
                     for net, dev in network.routed_networks(with_devices=True) if dev != self.bridge]
            for other in [*self.paths.root.glob("*/state.json"), *self.paths.root.glob("*/*/state.json")]:
                try:
                    recorded = json.loads(other.read_text()).get("subnet")
                    subnet = ipaddress.ip_network(recorded) if recorded else None
                except (OSError, ValueError, AttributeError):
                    continue
                if subnet and other.parent != self.paths.env_dir:
                    name = other.parent.relative_to(self.paths.root)
                    taken.append((subnet, f"environment {name}'s subnet {subnet}"))
            if self.env.subnet:  # fabula.yml's: checked here, where the machine's routes are known
                wanted = self.env.subnet
                clash = next((what for net, what in taken if wanted.overlaps(net)), None)
                if clash:
                    raise ConfigError(f"environments.{self.paths.env}.local.subnet: {wanted} overlaps {clash} "
                                      "on this machine",
                                      f"choose another private subnet for {self.paths.env} in fabula.yml, or leave "
                                      "`subnet` out for a free one")
                self.state.subnet = str(wanted)
                self.state.save(self.paths)  # claimed while the lock is held
                return str(wanted)
            for candidate in AUTO_SUBNETS.subnets(new_prefix=24):
                if not any(candidate.overlaps(t) for t, _ in taken):
                    self.state.subnet = str(candidate)
                    self.state.save(self.paths)  # claimed while the lock is held
                    return str(candidate)
        raise FabulaError(f"no free /24 left in {AUTO_SUBNETS}", "set `subnet:` for this environment")

    # -- servers --------------------------------------------------------------------------
    @property
    def machine_table(self) -> str:
        return f"fabula-{self.paths.tag}"

    def ensure_network(self) -> None:
        network.ensure_bridge(self.bridge, self.require_gateway(), self.require_subnet().prefixlen)
        # the machine's own side: its namespace is the load balancer's, and every process of the
        # machine shares it; only root's (HAProxy, fabula) may open connections to the servers,
        # and nothing is routed into or out of the environment's network
        ruleset = render(__file__, "machine.nft.j2", table=self.machine_table, bridge=self.bridge,
                         subnet=str(self.subnet), project=self.paths.project, env=self.paths.env)
        path = self.paths.env_dir / "machine.nft"
        path.write_text(ruleset)
        result = run_local(["nft", "-f", str(path)])
        if not result.ok:
            raise FabulaError(f"nft rejects {path}: {result.stderr.strip()}")

    def _host(self, name: str, role: str, address: str) -> LocalHost:
        return LocalHost(name, role, address, self.paths.servers_dir / name, self.netns(name),
                         Accounts(self.paths.tag))

    def ensure_accounts(self) -> Accounts:
        """The environment's system users and group (on this machine, shared by its servers), and
        its directory open to that group only."""
        accounts = Accounts(self.paths.tag)
        users.ensure(accounts, f"fabula {self.paths.project}/{self.paths.env}", self.paths.root / ".accounts.lock")
        self.paths.env_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.paths.env_dir, 0, users.gid(accounts.group))
        self.paths.env_dir.chmod(0o750)
        return accounts

    def host(self, name: str) -> Host:
        record = self.state.servers[name]
        return self._host(name, record.role, record.address)

    def assign_address(self, name: str) -> str:
        """The server's address: given once, recorded in the inventory before anything is made (a
        crash never gives it out twice), and never one used before while the subnet has another."""
        record = self.state.servers[name]
        if not record.address:
            record.address = self._new_address()
            self.state.save(self.paths)
        return record.address

    def _new_address(self) -> str:
        """The address after the highest one the environment used (wrapping round): a reused
        address would be reached at its former server's MAC address until the neighbours' ARP
        entries expire."""
        network = self.require_subnet()
        used = {s.address for s in self.state.servers.values() if s.address}
        used |= {self.state.last_address} if self.state.last_address else set()
        indexes = [i for i in (address_index(network, a) for a in used) if i is not None]
        highest = max(indexes, default=-1)
        address = next((a for a in server_addresses(network, highest + 1) if a not in used), None)
        if address is None:
            raise FabulaError(f"no address left in {network} for another server",
                              "use a larger `subnet` for this environment")
        self.state.last_address = address
        return address

    def prepare_host(self, host: Host, packages: tuple[str, ...]) -> None:
        """Every server shares this machine's packages (`make setup` installs them, with the
        distribution's services kept from starting): only check that they are there."""
        missing = [p for p in packages if p not in self._packages_seen
                   and "install ok installed" not in run_local(["dpkg-query", "-W", "-f=${Status}", p]).stdout]
        self._packages_seen.update(p for p in packages if p not in missing)
        if missing:
            raise PrerequisiteError(f"{host.name} ({host.role}) needs the Debian package(s) {', '.join(missing)}",
                                    f"run `make setup` or `apt-get install {' '.join(missing)}`")

    def platform_host(self) -> Host:
        return self.load_balancer.platform

    def list_servers(self) -> list[str]:
        prefix = f"fab.{self.paths.project}.{self.paths.env}."
        names = {ns[len(prefix):] for ns in network.netns_names() if ns.startswith(prefix)}
        if self.paths.servers_dir.exists():
            names |= {p.name for p in self.paths.servers_dir.iterdir()}
        return sorted(names)

    def server_exists(self, name: str) -> bool:
        return self.netns(name) in network.netns_names()

    def ensure_server(self, name: str, role: str) -> Host:
        address = self.assign_address(name)
        host = self._host(name, role, address)
        network.ensure_namespace(self.netns(name), network.veth_name(self.paths.tag, name), self.bridge,
                                 address, self.require_subnet().prefixlen, self.require_gateway())
        host.make_dirs([PurePosixPath(self.paths.servers_dir), host.root])
        host.make_dirs([host.path(d) for d in ("etc", "run", "log", "data", "releases", "tmp")])
        return host

    def apply_firewall(self, host: Host, rules: list[IngressRule | EgressRule]) -> bool:
        # the rules name roles and the load balancer; here they are addresses: the servers' of those
        # roles, and the machine's end of the bridge, where HAProxy's connections come from
        def addresses(roles: tuple[str, ...]) -> list[str]:
            return sorted(s.address for s in self.state.servers.values() if s.role in roles and s.address)

        ingress = [(r.port, addresses(r.from_roles) + ([self.require_gateway()] if r.from_load_balancer else []),
                    r.description) for r in rules if isinstance(r, IngressRule)]
        egress = [(r.port, addresses(r.to_roles), r.description) for r in rules if isinstance(r, EgressRule)]
        ruleset = render(__file__, "firewall.nft.j2", server=host.name, subnet=str(self.subnet),
                         ingress=ingress, egress=egress)
        changed = host.put_file(host.path("etc", "firewall.nft"), ruleset, mode=0o600)
        if changed or not host.run(["nft", "list", "table", "inet", "fabula"]).ok:
            host.check(["nft", "-f", str(host.path("etc", "firewall.nft"))])
        return changed

    def _stop_server(self, name: str, graceful: bool) -> None:
        netns = self.netns(name)
        if netns not in network.netns_names():
            return
        conf = self.paths.servers_dir / name / "supervisor" / "supervisord.conf"
        host = self._host(name, "", "")
        if graceful and host.supervisor_pid(conf):
            # an orderly stop first: PostgreSQL shuts down cleanly, Celery finishes its tasks
            host.run(["supervisorctl", "-c", str(conf), "shutdown"], timeout=90)
        # again until none is left: a dying RabbitMQ can start a new epmd (a daemon of its own)
        # after the list was taken, and a process left in it would keep the namespace alive
        for _ in range(5):
            pids = [int(p) for p in run_local(["ip", "netns", "pids", netns]).stdout.split()]
            if not pids:
                break
            kill_and_wait(pids, grace=15 if graceful else 0)

    def remove_server(self, name: str, drained: bool = False) -> None:
        # a drained server has nothing left to finish, and its files (logs included) go with it:
        # its programs are killed at once (a stop signal first cost 0.5-1.5 s under load)
        self._remove(name, graceful=not drained)

    def _remove(self, name: str, graceful: bool, files: bool = True) -> None:
        self._stop_server(name, graceful)
        network.remove_namespace(self.netns(name), network.veth_name(self.paths.tag, name))
        if files:
            shutil.rmtree(self.paths.servers_dir / name, ignore_errors=True)

    def destroy(self) -> list[str]:
        removed, failures = [], []
        if self.load_balancer.is_running():
            removed.append("load balancer")
        # everything of the environment killed at once, the load balancer (and the autoscaler under
        # its supervisor) too: nothing is worth an orderly stop when its data goes with it, and the
        # autoscaler changes nothing meanwhile, since it changes the group only under the lock
        # that this command holds
        kill_and_wait(processes_mentioning(str(self.paths.env_dir) + "/"), grace=0)
        self.load_balancer.stop()   # after the kill, only a HAProxy that outlived a crash is left to stop
        self.state.reload(self.paths)
        prefix = f"fab.{self.paths.project}.{self.paths.env}."
        names = sorted(set(self.list_servers()) | set(self.state.servers))
        removed += [f"server {n}" for n in names if self.server_exists(n)]
        # every server at once, and killed rather than stopped: their data goes with them, so an
        # orderly shutdown (a PostgreSQL checkpoint, Celery finishing its tasks) would only cost
        # time; one server that cannot be removed must not stop the others' removal. Their files
        # stay: they go with the environment's directory, in the background (operations/destroy.py)
        with ThreadPoolExecutor(max_workers=max(len(names), 1)) as pool:
            futures = {name: pool.submit(self._remove, name, False, False) for name in names}
        failures += [f"{name}: {f.exception()}" for name, f in futures.items() if f.exception()]
        # anything else still running from this environment's directory (e.g. after a crash)
        kill_and_wait(processes_mentioning(str(self.paths.env_dir) + "/"))
        for name in [ns for ns in network.netns_names() if ns.startswith(prefix)]:
            try:  # a second try, now that nothing of the environment runs any more
                self._remove(name[len(prefix):], graceful=False, files=False)
            except FabulaError as exc:
                failures.append(f"{name}: {exc}")
        if self.bridge in network.link_names():
            removed.append(f"bridge {self.bridge}")
        network.remove_bridge(self.bridge)
        if run_local(["nft", "delete", "table", "inet", self.machine_table]).ok:
            removed.append(f"firewall table {self.machine_table}")
        left = [ns for ns in network.netns_names() if ns.startswith(prefix)]
        if left:
            raise FabulaError(f"destroy could not remove {', '.join(left)}: " + "; ".join(failures),
                              "run `fabula destroy` again; `ip netns pids NAME` shows what holds one")
        removed += [f"user {name}" for name in
                    users.remove(Accounts(self.paths.tag), self.paths.root / ".accounts.lock")]
        return removed
