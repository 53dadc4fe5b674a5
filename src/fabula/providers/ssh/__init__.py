"""The ssh provider: the servers are existing Debian 12 hosts of the inventory (`hosts:`), reached
over SSH (providers/ssh/transport.py); fabula's tree on each is /srv/fabula/<project>/<env>/<server>/,
its supervisord run by a systemd unit where systemd runs (started again if it dies, and at boot;
providers/ssh/preparation.py) and directly where it does not, its firewall an nftables table of its
own, and the load balancer HAProxy on the `lb` host."""
from __future__ import annotations

import ipaddress
import json
import shutil
import socket
from functools import partial
from pathlib import Path, PurePosixPath

import asyncssh

from fabula import machine_users, program_home, secrets
from fabula.accounts import Accounts
from fabula.config import EnvironmentConfig, SshConfig
from fabula.errors import FabulaError, PrerequisiteError
from fabula.parallel import at_once
from fabula.providers.base import (
    BuildPlace,
    EgressRule,
    Host,
    IngressRule,
    ProgramHome,
    Provider,
    SharedStore,
)
from fabula.providers.haproxy import PACKAGES as LB_PACKAGES
from fabula.providers.haproxy import HAProxyLoadBalancer
from fabula.providers.ssh import scripts
from fabula.providers.ssh.preparation import TREE, Preparation
from fabula.providers.ssh.scripts import HostFacts
from fabula.providers.ssh.shared import HostStore
from fabula.providers.ssh.transport import SshHost, SshPool, SshTarget, host_key_error, recorded_keys
from fabula.state import EnvPaths, EnvState
from fabula.templates import render

SHIPPED_KEY = "ssh-key"   # the environment's own key, on the load balancer's host
APP_ROLES = ("web", "worker", "cache", "db-primary", "db-replica")
ROLLBACK_AFTER = 90   # seconds: a firewall fabula could not confirm is undone on the host by then


class SshProvider(Provider):
    name = "ssh"
    load_balancer: HAProxyLoadBalancer

    def __init__(self, paths: EnvPaths, env: EnvironmentConfig, state: EnvState, euid: int = 0,
                 controller_home: Path | None = None):
        """`controller_home`: this is fabula's program on the load balancer's host (program_home),
        in that folder: it reaches the hosts directly, with the key and host keys shipped there."""
        self.paths, self.env, self.state = paths, env, state
        assert env.ssh is not None  # EnvironmentConfig gives an ssh environment its section
        self.ssh: SshConfig = env.ssh
        if controller_home is not None:
            self.ssh = self.ssh.model_copy(update={
                "jump": None, "key": controller_home / SHIPPED_KEY, "known_hosts": controller_home / "known_hosts"})
        self._program_sources: list[str] | None = None
        self.accounts = Accounts(paths.tag)
        self.preparation = Preparation(paths.project, paths.env, paths.tag, self.accounts)
        self.env_root = self.preparation.env_root
        self.table = f"fabula-{paths.tag}"
        self.pool = SshPool()
        lb_name, lb = next((n, h) for n, h in env.hosts.items() if h.role == "lb")
        platform = self._ssh_host(lb_name, "lb", lb.address)
        self.load_balancer = HAProxyLoadBalancer(platform, env.lb, paths.pki_dir / "ca.pem", paths.project,
                                                 paths.env, public_address=lb.address, bind="0.0.0.0",
                                                 domains=env.domains)
        # the team's lock and files: on the load balancer's host, whose role never changes
        self.store = HostStore(platform, self.env_root / "shared", paths.tag)

    def shared_store(self) -> SharedStore:
        return self.store

    def close(self) -> None:
        self.pool.close()

    def program_home(self, config: Path, state_root: Path, python: str) -> ProgramHome:
        """fabula shipped to the load balancer's host (program_home.ship) with what it needs to
        reach the hosts: the environment's own key (authorized on every host from the load
        balancer's host only: _authorize_program) and their host keys as this machine knows them."""
        host = self.platform_host()
        files = {"known_hosts": self._known_hosts_lines(), SHIPPED_KEY: secrets.ssh_key(self.paths).read_bytes()}
        return program_home.ship(host, root=self.paths.root, python=python, config=config, project=self.paths.project,
                                 env=self.paths.env, files=files)

    def program_sources(self) -> list[str]:
        """The load balancer's host's own addresses, which fabula's program there connects from."""
        if self._program_sources is None:
            found = self.platform_host().check(["hostname", "-I"]).stdout.split()
            self._program_sources = sorted({a for a in found if _is_ipv4(a)}
                                           | {_ipv4(self.load_balancer.public_address)})
        return self._program_sources

    def _authorize_program(self, host: SshHost) -> None:
        """The environment's own key may log in as `ssh.user`, from the load balancer's host only,
        with no forwarding: what fabula's program there needs, and nothing more."""
        public = secrets.ssh_key(self.paths).with_name(secrets.SSH_KEY_FILE + ".pub").read_text().split()
        line = (f'from="{",".join(self.program_sources())}",no-agent-forwarding,no-port-forwarding,'
                f"no-X11-forwarding {public[0]} {public[1]} {self._program_mark()}")
        host.check(["sh", "-c", scripts.AUTHORIZE, "sh", self.ssh.user, self._program_mark(), line])

    def _program_mark(self) -> str:
        return f"fabula-{self.paths.tag}-program"

    def _known_hosts_lines(self) -> bytes:
        """The lines of this machine's known_hosts for the inventory's hosts."""
        targets = [self._target(host.address) for host in self.env.hosts.values()]
        return "".join(f"{t.known_hosts_name()} {key}\n" for t in targets
                       for key in recorded_keys(t.known_hosts_file(), t.known_hosts_name())).encode()

    # -- the inventory ------------------------------------------------------------------------
    def _target(self, address: str) -> SshTarget:
        return SshTarget(address, port=self.ssh.port, user=self.ssh.user, key=self.ssh.key,
                         known_hosts=self.ssh.known_hosts, jump=self.ssh.jump)

    def _ssh_host(self, name: str, role: str, address: str) -> SshHost:
        host = self.pool.host(name, role, self._target(address), self.env_root / name, self.accounts)
        # where systemd runs, the server's supervisord is started through its unit (asked lazily:
        # making a host object connects to nothing)
        host.start_supervisord = partial(self.preparation.start_supervisord, host)
        return host

    def _all_hosts(self) -> list[SshHost]:
        """Every host of the inventory, the load balancer's included, and any the state still
        records (a host removed from fabula.yml, until `create` or `destroy` clears it)."""
        hosts = {name: self._ssh_host(name, h.role, h.address) for name, h in self.env.hosts.items()}
        for name, record in (self.state.leaving | self.state.servers).items():
            if name not in hosts and record.address:
                hosts[name] = self._ssh_host(name, record.role, record.address)
        return list(hosts.values())

    def _each(self, hosts: list[SshHost], action) -> list:
        """`action` on every host at once; one error naming every host that failed."""
        return at_once(hosts, action, name=lambda h: h.name,
                       hint="fix what each host's message says, then run the command again")

    # -- checks -----------------------------------------------------------------------------
    def check_prerequisites(self) -> None:
        if shutil.which("ssh") is None:
            raise PrerequisiteError("the OpenSSH client (`ssh`) is missing: `fabula exec` and `logs -f` use it",
                                    "run `apt-get install openssh-client`")

    def check_can_create(self, config_path: str) -> None:
        """Every host answers over SSH and runs Debian 12: checked before anything is made."""
        hosts = self._all_hosts()
        wrong = [(h, f) for h, f in zip(hosts, self._each(hosts, self.facts), strict=True)
                 if (f.distribution, f.version) != ("debian", scripts.DEBIAN_VERSION)]
        if wrong:
            raise FabulaError("; ".join(f"{h.name} ({h.address}) runs {f.distribution} {f.version}"
                                        for h, f in wrong) + f": fabula needs Debian {scripts.DEBIAN_VERSION}",
                              f"install Debian {scripts.DEBIAN_VERSION} on those hosts, or take them out of "
                              f"`hosts:` in {config_path}")

    def trust_host_keys(self) -> list[str]:
        """Each host's key as it presents it now, recorded in known_hosts if it is not there; a key
        that differs from a recorded one is refused (it may be an attack), never replaced."""
        known = (self.ssh.known_hosts or Path.home() / ".ssh" / "known_hosts")
        lines, changed = [], []
        for host in self._all_hosts():
            key = self.pool.call(self.pool.host_key(host.name, host.target))
            name = host.target.known_hosts_name()
            recorded = asyncssh.read_known_hosts(str(known)).match(host.address, host.address, host.target.port)[0] \
                if known.is_file() else []
            fingerprint = f"{key.get_algorithm()} {key.get_fingerprint()}"
            if any(k.public_data == key.public_data for k in recorded):
                lines.append(f"{host.name} {name}: {fingerprint} (already known)")
            elif recorded:
                raise host_key_error(host.name, host.target)
            else:
                changed.append(f"{name} {key.export_public_key('openssh').decode().strip()}\n")
                lines.append(f"{host.name} {name}: {fingerprint} (recorded)")
        if changed:
            known.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(known, "a") as fh:
                fh.writelines(changed)
        return lines

    def build_place(self) -> BuildPlace:
        """This machine when the app's hosts run its distribution, architecture and Python (a
        virtualenv holds compiled wheels and the interpreter's path); else, or when `ssh.build` is
        `worker`, the worker host (the first web host without one), prepared for it here."""
        here = self.this_machine()
        app_hosts = [h for h in self._all_hosts() if h.role in ("worker", "web")]
        app_hosts.sort(key=lambda h: h.role != "worker")
        facts = self._each(app_hosts, self.facts)
        system = [(f.distribution, f.version, f.architecture, f.python) for f in facts]
        differ = [(h, f) for h, f, s in zip(app_hosts, facts, system, strict=True)
                  if s != (here.distribution, here.version, here.architecture, here.python)]
        choice = self.ssh.build
        if choice == "here" and differ:
            raise FabulaError(f"releases are built on this machine ({here.describe()}) (ssh.build: here), but "
                              + "; ".join(f"{h.name} runs {f.describe()}" for h, f in differ)
                              + ": a virtualenv built here would not run there",
                              "set `ssh.build: auto` (or `worker`) in fabula.yml: the worker host builds them")
        if choice == "here" or (choice == "auto" and not differ):
            return BuildPlace(f"this machine: it matches the app's hosts ({here.describe()})")
        builder, its = app_hosts[0], facts[0]
        unlike = [h.name for h, s in zip(app_hosts, system, strict=True) if s != system[0]]
        if unlike:
            raise FabulaError(f"the app's hosts run different systems: {builder.name} runs {its.describe()}, unlike "
                              f"{', '.join(unlike)}; one release runs on all of them",
                              "give the web and worker hosts the same Debian release, architecture and Python")
        self.preparation.make_tree(builder)
        self.preparation.install(builder, ("python3-venv", "ca-certificates"))
        reason = ("ssh.build is worker" if choice == "worker"
                  else f"this machine runs {here.describe()}, the app's hosts {its.describe()}")
        return BuildPlace(f"{builder.name} ({builder.address}): {reason}", host=builder)

    def this_machine(self) -> HostFacts:
        return scripts.this_machine()

    def facts(self, host: SshHost) -> HostFacts:
        return self.preparation.facts(host)

    # -- the environment's network: its hosts are there; the load balancer's host is prepared ---
    def allocate_subnet(self) -> str:
        return ""   # the hosts have their addresses

    def ensure_network(self) -> None:
        lb = self.load_balancer.platform
        assert isinstance(lb, SshHost)
        self.prepare_host(lb, LB_PACKAGES)
        self._make_tree(lb)
        self.apply_firewall(lb, [IngressRule(self.env.lb.https_port, "https from anywhere", from_anywhere=True),
                                 IngressRule(self.env.lb.http_port, "http from anywhere", from_anywhere=True),
                                 EgressRule(443, "https to the web servers", to_roles=("web",)),
                                 EgressRule(self.ssh.port, "ssh from fabula's program to the hosts",
                                            to_roles=APP_ROLES)])
        self._ensure_sysadmins()
        self._authorize_program(lb)

    def ensure_accounts(self) -> Accounts:
        self._each(self._all_hosts(), self.preparation.ensure_accounts)
        return self.accounts

    def _ensure_sysadmins(self) -> None:
        """Each `users` entry on every host; one fabula made before that the file no longer
        lists is removed (fabula's record of those it made is a file on each host)."""
        wanted = {u.name: "\n".join(u.keys) for u in self.env.users}
        record = self.env_root / "sysadmins.json"

        def converge(host: SshHost) -> None:
            made = json.loads(host.read_file(record) or b"[]")
            for name in sorted(set(made) - set(wanted)):
                host.check(["sh", "-c", scripts.REMOVE_SYSADMIN, "sh", name, self._sudoers(name)])
            for name, keys in wanted.items():
                host.check(["sh", "-c", scripts.SYSADMIN, "sh", name, self._sudoers(name), keys])
            host.put_file(record, json.dumps(sorted(wanted)), mode=0o600)

        self._each(self._all_hosts(), converge)

    def _sudoers(self, user: str) -> str:
        return f"/etc/sudoers.d/fabula-{self.paths.tag}-{user}"

    # -- servers ------------------------------------------------------------------------------
    def host(self, name: str) -> Host:
        record = self.state.servers.get(name) or self.state.leaving[name]
        return self._ssh_host(name, record.role, record.address)

    def ensure_server(self, name: str, role: str) -> Host:
        record = self.state.servers[name]
        if not record.address:
            record.address = self.env.hosts[name].address
            self.state.save(self.paths)
        host = self._ssh_host(name, role, record.address)
        self._make_tree(host)
        self._authorize_program(host)
        return host

    def _make_tree(self, host: SshHost) -> None:
        self.preparation.make_tree(host)

    def server_exists(self, name: str) -> bool:
        return name in self.env.hosts or name in self.state.servers or name in self.state.leaving

    def list_servers(self) -> list[str]:
        return sorted({n for n, h in self.env.hosts.items() if h.role != "lb"} | set(self.state.servers)
                      | set(self.state.leaving))

    def prepare_host(self, host: Host, packages: tuple[str, ...]) -> None:
        sysadmins = ("sudo",) if self.env.users else ()
        self.preparation.install(host, sysadmins + packages)

    def platform_host(self) -> Host:
        return self.load_balancer.platform

    # -- firewalls ----------------------------------------------------------------------------
    def _addresses(self, roles: tuple[str, ...]) -> list[str]:
        found = [h.address for h in self.env.hosts.values() if h.role in roles]
        found += [s.address for s in self.state.servers.values() if s.role in roles and s.address]
        return sorted({_ipv4(a) for a in found})

    def apply_firewall(self, host: Host, rules: list[IngressRule | EgressRule]) -> bool:
        assert isinstance(host, SshHost)
        lb_address = _ipv4(self.load_balancer.public_address)
        ingress = []
        for rule in (r for r in rules if isinstance(r, IngressRule)):
            sources: str | list[str] = ("any" if rule.from_anywhere else
                                        self._addresses(rule.from_roles) + ([lb_address] if rule.from_load_balancer
                                                                            else []))
            ingress.append((rule.port, sources, rule.description))
        egress = [(r.port, self._addresses(r.to_roles), r.description) for r in rules if isinstance(r, EgressRule)]
        # fabula's program on the load balancer's host reaches every host over SSH too
        admins = [*self.env.admin_sources, ipaddress.ip_network(host.client_address()),
                  *(ipaddress.ip_network(a) for a in self.program_sources())]
        ruleset = render(__file__, "firewall.nft.j2", server=host.name, project=self.paths.project,
                         env=self.paths.env, table=self.table, ssh_port=self.ssh.port,
                         environment4=self._addresses(("lb", *APP_ROLES)),
                         ssh4=sorted({str(n) for n in admins if n.version == 4}),
                         ssh6=sorted({str(n) for n in admins if n.version == 6}), ingress=ingress, egress=egress)
        path, saved = host.path("etc", "firewall.nft"), host.path("etc", "firewall.before")
        changed = host.put_file(path, ruleset, mode=0o600)
        if not changed and host.run(["nft", "list", "table", "inet", self.table]).ok:
            return False
        applied = host.run(["sh", "-c", scripts.APPLY_FIREWALL, "sh", self.table, str(path), str(saved),
                            str(ROLLBACK_AFTER)])
        if not applied.ok:
            raise FabulaError(f"{host.name}: nft refuses the firewall {path}: {applied.stderr.strip()[-1000:]}")
        self._confirm_reachable(host, saved)
        return True

    def _confirm_reachable(self, host: SshHost, saved: PurePosixPath) -> None:
        """A new SSH connection must still get in before the firewall is kept: if none does, the
        former rules come back (through the connection that is open, which the firewall keeps)."""
        try:
            with SshPool(connect_timeout=15) as fresh:
                fresh.host(host.name, host.role, host.target, host.root).check(["true"], timeout=15)
        except FabulaError as exc:
            host.run(["sh", "-c", "kill $(cat \"$1.pid\") 2>/dev/null; nft flush table inet \"$2\"; "
                      "if [ -s \"$1\" ]; then nft -f \"$1\"; else nft delete table inet \"$2\"; fi",
                      "sh", str(saved), self.table])
            raise FabulaError(f"{host.name}: with the new firewall, a new SSH connection from this machine does "
                              f"not get in ({exc}); the former rules are back",
                              "check `admin_sources` and `ssh.port` in fabula.yml") from None
        host.check(["sh", "-c", scripts.CANCEL_ROLLBACK, "sh", str(saved)])
        # what the server's unit loads when it (re)starts: only a ruleset that let SSH in
        host.check(["cp", "--", str(host.path("etc", "firewall.nft")), str(host.path("etc", "firewall.confirmed"))])

    # -- removal ------------------------------------------------------------------------------
    def _stop_and_remove(self, host: SshHost) -> None:
        # where systemd runs, its unit first: `systemctl stop` returns once supervisord and its
        # programs are gone, and nothing starts them again; STOP_SERVER then stops a supervisord
        # started directly (no systemd) and kills whatever else still runs from the server's tree
        self.preparation.remove_boot_unit(host)
        host.check(["sh", "-c", scripts.STOP_SERVER, "sh", str(self.env_root), str(host.root)], timeout=120)
        host.check(["sh", "-c", scripts.REMOVE_FIREWALL, "sh", self.table, str(host.path("etc", "firewall.before"))])
        host.check(["rm", "-rf", "--", str(host.root)], timeout=300)

    def remove_server(self, name: str, drained: bool = False) -> None:
        """A server taken out of `hosts:`: its tree, firewall and processes, and the environment's
        users and files on its host unless the environment still has more there."""
        host = self.host(name)
        assert isinstance(host, SshHost)
        self._stop_and_remove(host)
        others = host.run(["find", str(self.env_root), "-mindepth", "1", "-maxdepth", "1", "-type", "d"])
        if not others.ok or others.stdout.strip():
            return  # the environment has more on this host (another of its servers, its shared files)
        self._remove_environment(host)

    def _leave(self, host: SshHost) -> str:
        """Everything of the environment's on `host`; the host stays reachable over SSH."""
        self._stop_and_remove(host)
        return self._remove_environment(host)

    def _remove_environment(self, host: SshHost) -> str:
        """The environment's users, sysadmins and tree on `host`, once its server there is gone."""
        # first: fabula's program's key must not outlive a destroy that fails further on
        host.check(["sh", "-c", scripts.AUTHORIZE, "sh", self.ssh.user, self._program_mark(), ""])
        made = json.loads(host.read_file(self.env_root / "sysadmins.json") or b"[]")
        for name in made:
            host.check(["sh", "-c", scripts.REMOVE_SYSADMIN, "sh", name, self._sudoers(name)])
        host.check(["sh", "-c", scripts.REMOVE_ACCOUNTS, "sh", self.accounts.group,
                    *self.accounts.users().values()], timeout=60)
        host.check(["rm", "-rf", "--", str(self.env_root)], timeout=300)
        # the team lock's files (the lock this command holds goes with its channel)
        host.run(["rm", "-f", "--", str(self.store.lock_file), str(self.store.holder_file)])
        # fabula's tree and its host-wide lock, if no other environment is there
        host.run(["sh", "-c", 'rmdir -- "$1" "$2" 2>/dev/null && rm -f -- "$3"; exit 0', "sh",
                  str(TREE / self.paths.project), str(TREE), scripts.LOCK])
        return f"host {host.name} ({host.address}): fabula's processes, files, firewall and users"

    def destroy(self) -> list[str]:
        """Everything fabula put on the hosts: processes, files, firewall tables, the users it
        made; the hosts stay reachable over SSH (their own sshd and login users are not fabula's)."""
        hosts = self._all_hosts()
        # the load balancer's supervisord first: it runs the autoscaler, which could add a server.
        # Where systemd runs it, through its unit (a `supervisorctl shutdown` would have it
        # started again, with the autoscaler, RESTART_SEC later)
        lb = self.load_balancer.platform
        assert isinstance(lb, SshHost)
        self.preparation.stop_supervisord(lb)
        if self.load_balancer.is_running():
            self.load_balancer.stop()
        removed = self._each(hosts, self._leave)
        # the users its releases were built as, on this machine
        removed += [f"user {name}" for name in machine_users.remove(self.accounts, self.paths.root / ".accounts.lock")]
        return removed


def _is_ipv4(address: str) -> bool:
    try:
        ipaddress.IPv4Address(address)
        return True
    except ValueError:
        return False


def _ipv4(address: str) -> str:
    """An inventory address for a firewall rule: a host name is resolved (nftables takes addresses)."""
    try:
        return str(ipaddress.IPv4Address(address))
    except ValueError:
        try:
            return socket.gethostbyname(address)
        except OSError as exc:
            raise FabulaError(f"cannot resolve {address}: {exc}",
                              "give the host's address in `hosts:`, or make its name resolvable here") from None
