"""The explicit context every operation and role receives: no module-level globals."""
from __future__ import annotations

from dataclasses import dataclass, field

from fabula.config import EnvironmentConfig, LoadedConfig
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

    def host(self, name: str) -> Host:
        if name not in self.hosts:
            self.hosts[name] = self.provider.host(name)
        return self.hosts[name]
