"""How fabula reaches its instances: over the ssh provider's transport (one SshPool, made on first
use), as `ssh.user` with the environment's key, through `ssh.jump` when there is one. A test
passes an Access of its own (fabula.testing.FakeAccess) so that no connection is made."""
from __future__ import annotations

import time
from pathlib import Path, PurePosixPath
from typing import Protocol

from fabula.accounts import Accounts
from fabula.config import SshConfig
from fabula.errors import FabulaError
from fabula.providers.base import Host
from fabula.providers.ssh.transport import SshPool, SshTarget

SSHD_WAIT = 300   # seconds a new instance may take to boot until its sshd answers


class Access(Protocol):
    def host(self, name: str, role: str, ssh_address: str, address: str, root: PurePosixPath,
             accounts: Accounts) -> Host:
        """The server `name`, reached at `ssh_address`, whose own address (what it binds, what
        its peers reach) is `address`."""
        ...

    def host_key(self, name: str, ssh_address: str) -> str:
        """The key the server presents now, as a known_hosts key ("ssh-ed25519 AAAA...")."""
        ...


class SshAccess:
    def __init__(self, ssh: SshConfig, key: Path, known_hosts: Path):
        self.ssh, self.key, self.known_hosts = ssh, key, known_hosts
        self._pool: SshPool | None = None

    @property
    def pool(self) -> SshPool:
        if self._pool is None:
            self._pool = SshPool()
        return self._pool

    def target(self, address: str) -> SshTarget:
        return SshTarget(address, port=self.ssh.port, user=self.ssh.user, key=self.key, known_hosts=self.known_hosts,
                         jump=self.ssh.jump)

    def host(self, name: str, role: str, ssh_address: str, address: str, root: PurePosixPath,
             accounts: Accounts) -> Host:
        host = self.pool.host(name, role, self.target(ssh_address), root, accounts)
        # SshHost takes its address from its target; without a jump host that is the public
        # address, which is not on the instance's interface (AWS translates it): the roles bind
        # to host.address and their peers reach it, so it is the private one
        host.address = address
        return host

    def host_key(self, name: str, ssh_address: str) -> str:
        deadline = time.monotonic() + SSHD_WAIT
        while True:
            try:
                key = self.pool.call(self.pool.host_key(name, self.target(ssh_address)))
                return key.export_public_key("openssh").decode().strip()
            except FabulaError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(5)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

