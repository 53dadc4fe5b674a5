"""Making a Debian host ready for fabula over its transport, for every provider whose servers are
reached over SSH (ssh: the inventory's hosts; aws: fabula's own instances): the environment's
system users, the server's tree with its boot unit, and the role's packages with the
distribution's own services kept from holding fabula's ports."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

from fabula.accounts import Accounts
from fabula.errors import FabulaError
from fabula.providers.base import Host
from fabula.providers.ssh import scripts
from fabula.providers.ssh.scripts import HostFacts

TREE = PurePosixPath("/srv/fabula")


@dataclass
class Preparation:
    """One environment's way of preparing its hosts: `env_root` is its tree on every host
    (/srv/fabula/<project>/<env>), `firewall` whether the boot unit loads the host's nftables
    file (the ssh provider's firewall; on AWS the security groups are the firewall)."""

    project: str
    env: str
    tag: str
    accounts: Accounts
    firewall: bool = True
    _facts: dict[str, HostFacts] = field(default_factory=dict, repr=False)

    @property
    def env_root(self) -> PurePosixPath:
        return TREE / self.project / self.env

    def facts(self, host: Host) -> HostFacts:
        # asked once per host and operation: the distribution does not change under a command
        if host.name not in self._facts:
            self._facts[host.name] = HostFacts.parse(host.check(["sh", "-c", scripts.FACTS]).stdout)
        return self._facts[host.name]

    def ensure_accounts(self, host: Host) -> None:
        comment = f"fabula {self.project}/{self.env}"
        host.check(["sh", "-c", scripts.ACCOUNTS, "sh", self.accounts.group, comment, *self.accounts.users().values()])

    def install(self, host: Host, packages: tuple[str, ...]) -> None:
        """The base packages and `packages` installed; their distribution services masked."""
        wanted = tuple(dict.fromkeys(scripts.BASE_PACKAGES + packages))
        result = host.run(["sh", "-c", scripts.INSTALL, "sh", *wanted], timeout=1800)
        if not result.ok:
            raise FabulaError(f"{host.name}: installing {' '.join(wanted)} failed:\n{result.stderr.strip()[-2000:]}",
                              "run `apt-get install` of those packages on the host and read its error")
        units = [u for p in wanted for u in scripts.UNITS.get(p, ())]
        host.check(["sh", "-c", scripts.MASK_UNITS, "sh", *units])

    def unit_name(self, host: Host) -> str:
        return f"fabula-{self.tag}-{host.name}.service"

    def boot_unit(self, host: Host) -> None:
        """Where systemd runs: a unit that, at boot, loads the server's firewall and starts its
        supervisord (so everything comes back after a reboot). fabula itself starts supervisord
        the first time (Supervisor.ensure_running); the unit is enabled, not started."""
        if not self.facts(host).systemd:
            return
        conf = host.path("supervisor", "supervisord.conf")
        firewall = f"ExecStartPre=-/usr/sbin/nft -f {host.path('etc', 'firewall.nft')}\n" if self.firewall else ""
        unit = (f"# written by fabula: {self.project}/{self.env} {host.name}\n"
                "[Unit]\nDescription=fabula server " + f"{self.project}/{self.env}/{host.name}\n"
                "After=network-online.target\nWants=network-online.target\n\n"
                "[Service]\nType=simple\n"
                f"{firewall}"
                f"ExecStart=/usr/bin/supervisord -n -c {conf}\nRestart=on-failure\n\n"
                "[Install]\nWantedBy=multi-user.target\n")
        if host.put_file(PurePosixPath("/etc/systemd/system") / self.unit_name(host), unit):
            host.check(["systemctl", "daemon-reload"])
            host.check(["systemctl", "enable", self.unit_name(host)])

    def make_tree(self, host: Host) -> None:
        host.make_dirs([TREE, TREE / self.project])
        # the environment's tree is open to its group only, as the local provider's directory
        host.make_dirs([self.env_root], mode=0o750)
        host.check(["chgrp", self.accounts.group, str(self.env_root)])
        host.make_dirs([host.root])
        host.make_dirs([host.path(d) for d in ("etc", "run", "log", "data", "releases", "tmp")])
        self.boot_unit(host)
