"""The explicit context every operation and role receives: no module-level globals."""
from __future__ import annotations

from dataclasses import dataclass, field

from fabula.config import EnvironmentConfig, LoadedConfig
from fabula.errors import FabulaError
from fabula.output import Output
from fabula.pki import CertificateAuthority
from fabula.providers.base import Host, Provider
from fabula.secrets import Secrets
from fabula.state import EnvPaths, EnvState


@dataclass(frozen=True)
class Release:
    id: str
    commit: str
    path: str   # where the built release is, on the machine running fabula


@dataclass
class Context:
    config: LoadedConfig
    env_name: str
    env: EnvironmentConfig
    paths: EnvPaths
    state: EnvState
    out: Output
    provider: Provider
    secrets: Secrets | None = None
    ca: CertificateAuthority | None = None
    release: Release | None = None
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def project(self) -> str:
        return self.config.project.project

    @property
    def database_name(self) -> str:
        return self.project.replace("-", "_")

    def require_release(self) -> Release:
        """The release being installed; an error if the operation has not chosen one."""
        if self.release is None:
            raise FabulaError(f"{self.env_name}: no release chosen for this operation (internal error)")
        return self.release

    def require_secrets(self) -> Secrets:
        """The environment's secrets; an error if the operation has not loaded them."""
        if self.secrets is None:
            raise FabulaError(f"{self.env_name}: the environment's secrets are not loaded (internal error)")
        return self.secrets

    def require_ca(self) -> CertificateAuthority:
        """The environment's certificate authority; an error if the operation has not loaded it."""
        if self.ca is None:
            raise FabulaError(f"{self.env_name}: the environment's certificate authority is not loaded "
                              "(internal error)")
        return self.ca

    def host(self, name: str) -> Host:
        if name not in self.hosts:
            self.hosts[name] = self.provider.host(name)
        return self.hosts[name]
