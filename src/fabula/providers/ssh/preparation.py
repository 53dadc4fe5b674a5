"""Making a Debian host ready for fabula over its transport, for every provider whose servers are
reached over SSH (ssh: the inventory's hosts; aws: fabula's own instances): the environment's
system users, the server's tree with the systemd unit that runs its supervisord (where systemd
runs), and the role's packages with the distribution's own services kept from holding fabula's
ports."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from fabula.accounts import Accounts
from fabula.errors import FabulaError
from fabula.providers.base import SYSTEM_PATH, Host
from fabula.providers.ssh import scripts
from fabula.providers.ssh.scripts import HostFacts

TREE = PurePosixPath("/srv/fabula")
UNIT_DIR = PurePosixPath("/etc/systemd/system")
# what a value written into the unit file may hold: no whitespace, quotes, backslashes, newlines,
# `%` (systemd's specifiers), `$` (its variables) or `;` (a command separator), which would change
# what the file says; the names and paths fabula writes there (from validated names) never do
UNIT_VALUE = re.compile(r"[A-Za-z0-9_./@:+-]+", re.ASCII)
UNIT_NAME = re.compile(r"[A-Za-z0-9_.-]+\.service", re.ASCII)
# the unit's restart policy: a supervisord that dies (killed, or stopped other than by
# `systemctl stop`) is started again after RESTART_SEC seconds, however often (never given up on)
RESTART_SEC = 2
# seconds `systemctl stop` (and a reboot) gives supervisord to stop its programs, each its own
# way, before what is left of the unit is killed
STOP_TIMEOUT = 90


def unit_value(value: str) -> str:
    """A name or path as it is written into the unit file; refused if it could change its structure."""
    if not UNIT_VALUE.fullmatch(value):
        raise ValueError(f"refusing to write {value!r} into a systemd unit: only letters, digits and "
                         "_ . / @ : + - are allowed there")
    return value


@dataclass
class Preparation:
    """One environment's way of preparing its hosts: `env_root` is its tree on every host
    (/srv/fabula/<project>/<env>), `firewall` whether the unit loads the host's nftables
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
        name = f"fabula-{self.tag}-{host.name}.service"
        if not UNIT_NAME.fullmatch(name):
            raise ValueError(f"refusing {name!r} as a systemd unit's name")
        return name

    def unit_text(self, host: Host) -> str:
        """The server's unit: it loads the server's firewall, then runs its supervisord in the
        foreground, so that systemd starts it again if it dies and at boot."""
        project, env, server = (unit_value(v) for v in (self.project, self.env, host.name))
        conf = unit_value(str(host.path("supervisor", "supervisord.conf")))
        # the last ruleset a new SSH connection was seen to get through (ssh provider's
        # _confirm_reachable): a refused one, rolled back, must not come back at a restart
        firewall = unit_value(str(host.path("etc", "firewall.confirmed")))
        return "".join([
            f"# written by fabula: {project}/{env} {server}\n",
            "[Unit]\n",
            f"Description=fabula server {project}/{env}/{server}\n",
            "After=network-online.target\n",
            "Wants=network-online.target\n",
            "StartLimitIntervalSec=0\n",
            "\n[Service]\n",
            "Type=exec\n",
            # the environment of fabula's own commands (the transport's), which a supervisord it
            # started directly would have had: its programs run the same however it was started
            f"Environment=PATH={unit_value(SYSTEM_PATH)} LANG=C.UTF-8 HOME=/root\n",
            f"ExecStartPre=-/usr/sbin/nft -f {firewall}\n" if self.firewall else "",
            f"ExecStart=/usr/bin/supervisord -n -c {conf}\n",
            "Restart=always\n",
            f"RestartSec={RESTART_SEC}\n",
            # TERM to supervisord alone, which stops each program its own way (stopsignal,
            # stopwaitsecs); what is left of them once it has exited is killed (also after a
            # supervisord that was killed, before the new one starts them again)
            "KillMode=mixed\n",
            f"TimeoutStopSec={STOP_TIMEOUT}\n",
            "\n[Install]\n",
            "WantedBy=multi-user.target\n",
        ])

    def boot_unit(self, host: Host) -> None:
        """Where systemd runs: the unit that runs the server's supervisord (see unit_text),
        written and enabled, so that it starts at boot. It is started when supervisord is first
        needed (Supervisor.ensure_running, through start_supervisord), once its configuration
        is there."""
        if not self.facts(host).systemd:
            return
        if host.put_file(UNIT_DIR / self.unit_name(host), self.unit_text(host)):
            host.check(["systemctl", "daemon-reload"])
            host.check(["systemctl", "enable", self.unit_name(host)])

    def start_supervisord(self, host: Host) -> bool:
        """Host.start_supervisord for the hosts this prepares: where systemd runs, the server's
        supervisord started through its unit (written first if it is missing or differs), so
        that systemd supervises it; False where systemd does not run (it is started directly),
        once the server's firewall is loaded as the unit would (a host back from a reboot has none)."""
        if not self.facts(host).systemd:
            if self.firewall:
                host.check(["sh", "-c", '[ ! -s "$1" ] || nft -f "$1"', "sh",
                            str(host.path("etc", "firewall.confirmed"))])
            return False
        self.boot_unit(host)
        host.check(["systemctl", "start", self.unit_name(host)])
        return True

    def stop_supervisord(self, host: Host) -> None:
        """Where systemd runs: the server's unit stopped, and so its supervisord and programs;
        `systemctl stop` returns once they are gone, and the unit does not start them again
        (stopped any other way, e.g. `supervisorctl shutdown`, supervisord would be back after
        RESTART_SEC). Nothing where systemd does not run."""
        if self.facts(host).systemd:
            host.run(["systemctl", "stop", self.unit_name(host)], timeout=STOP_TIMEOUT + 30)

    def remove_boot_unit(self, host: Host) -> None:
        """Where systemd runs: the server's unit stopped (see stop_supervisord), disabled and
        removed. What is already gone is fine."""
        if not self.facts(host).systemd:
            return
        unit = self.unit_name(host)
        self.stop_supervisord(host)
        host.run(["systemctl", "disable", unit])
        host.run(["rm", "-f", "--", str(UNIT_DIR / unit)])
        host.run(["systemctl", "daemon-reload"])
        host.run(["systemctl", "reset-failed", unit])   # a unit that failed stays listed until then

    def make_tree(self, host: Host) -> None:
        host.make_dirs([TREE, TREE / self.project])
        # the environment's tree is open to its group only, as the local provider's directory
        host.make_dirs([self.env_root], mode=0o750)
        host.check(["chgrp", self.accounts.group, str(self.env_root)])
        host.make_dirs([host.root])
        host.make_dirs([host.path(d) for d in ("etc", "run", "log", "data", "releases", "tmp")])
        self.boot_unit(host)
