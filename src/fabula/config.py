"""The schema of fabula.yml, loaded and validated once.

Every error names the file, the key path and what is expected, and is raised before
anything is created.
"""
from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fabula.errors import ConfigError

ROLES = ("web", "worker", "cache", "db-primary", "db-replica")
SLUG = r"^[a-z][a-z0-9-]{0,19}$"
DOTTED_CALLABLE = r"^[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?$"
# network address, broadcast address and the host's bridge address are not for servers
RESERVED_ADDRESSES = 3


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


Port = Annotated[int, Field(ge=1, le=65535)]


class AppConfig(Strict):
    source: Path = Field(default=Path("."), description="the Django project's folder, in a git repository")
    wsgi: Annotated[str, Field(pattern=DOTTED_CALLABLE)]
    settings: Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*$")]
    requirements: str = "requirements.txt"
    celery: Annotated[str, Field(pattern=DOTTED_CALLABLE)] | None = None
    manage: str = "manage.py"
    maintenance_page: Path | None = Field(default=None, description=(
        "HTML file (relative to the config) served with status 503 during maintenance"))
    python: str = Field(default="/usr/bin/python3", description="interpreter the app's virtualenv is built on")


class ServerCounts(Strict):
    web: Annotated[int, Field(ge=1, le=32)] = 2
    worker: Annotated[int, Field(ge=0, le=1)] = 1
    cache: Annotated[int, Field(ge=1, le=1)] = 1
    db_primary: Annotated[int, Field(ge=1, le=1, alias="db-primary")] = 1
    db_replica: Annotated[int, Field(ge=0, le=4, alias="db-replica")] = 1

    def by_role(self) -> dict[str, int]:
        return {"db-primary": self.db_primary, "db-replica": self.db_replica, "cache": self.cache,
                "worker": self.worker, "web": self.web}

    def total(self) -> int:
        return sum(self.by_role().values())


class LoadBalancerConfig(Strict):
    bind: ipaddress.IPv4Address = ipaddress.IPv4Address("127.0.0.1")
    https_port: Port = 8443
    http_port: Port = 8080
    certificate: Path | None = Field(default=None, description="PEM certificate (chain); self-signed when absent")
    key: Path | None = None

    @model_validator(mode="after")
    def _cert_and_key_together(self):
        if (self.certificate is None) != (self.key is None):
            raise ValueError("give both `certificate` and `key`, or neither (a self-signed one is made)")
        if self.https_port == self.http_port:
            raise ValueError("`https_port` and `http_port` must differ")
        return self


class DatabaseConfig(Strict):
    synchronous: bool = Field(default=False, description=(
        "a commit returns only once a replica has it: no acknowledged write is lost in a failover, "
        "but writes wait for the replica (and stop while no replica is streaming)"))
    backups: Path | None = Field(default=None, description="folder for `fabula db backup`; default "
                                 "<state root>/backups/<project>-<env>")


# addresses of a subnet that servers never get: network, broadcast, and .1-.9 (the host's end of
# the bridge and the ones kept free, see topology.FIRST_HOST)
UNSERVED_ADDRESSES = 11


class AutoscalingConfig(Strict):
    """The web tier as an autoscaling group: how many web servers, and what demand each takes."""

    min: Annotated[int, Field(ge=1, le=64)] = 1
    desired: Annotated[int, Field(ge=1, le=64)] | None = Field(default=None, description=(
        "web servers to start with; default servers.web (within min..max)"))
    max: Annotated[int, Field(ge=1, le=64)] | None = Field(default=None, description="default: desired")
    metric: Literal["sessions", "requests"] = Field(default="sessions", description=(
        "demand per in-service web server: `sessions` (requests in progress, HAProxy's scur) or "
        "`requests` (requests per second)"))
    target: Annotated[float, Field(gt=0)] | None = Field(default=None, description=(
        "the demand per web server the group keeps to; default gunicorn_workers sessions, or "
        "10 x gunicorn_workers requests/s"))
    scale_out_cooldown: Annotated[float, Field(ge=0, le=86400)] = 30
    scale_in_cooldown: Annotated[float, Field(ge=0, le=86400)] = 60
    health_grace: Annotated[float, Field(ge=0, le=3600)] = 15
    interval: Annotated[float, Field(ge=0.5, le=300)] = 2
    window: Annotated[float, Field(gt=0, le=3600)] = Field(default=10, description=(
        "seconds the demand is averaged over before it is compared with the target"))


class EnvironmentConfig(Strict):
    provider: Literal["local"] = "local"
    production: bool = Field(default=False, description="refuse destructive copies into it without --force")
    db: DatabaseConfig = DatabaseConfig()
    servers: ServerCounts = ServerCounts()
    lb: LoadBalancerConfig = LoadBalancerConfig()
    subnet: ipaddress.IPv4Network | None = Field(
        default=None, description="addresses for the servers; a free /24 in 10.213.0.0/16 when absent")
    hosts: list[str] = Field(default_factory=list, description="extra host names for DJANGO_ALLOWED_HOSTS")
    gunicorn_workers: Annotated[int, Field(ge=1, le=64)] = 2
    celery_concurrency: Annotated[int, Field(ge=1, le=64)] = 2
    celery_drain_timeout: Annotated[int, Field(ge=1, le=86400, description=(
        "seconds a stopping Celery worker may take to finish the tasks in flight"))] = 600
    autoscaling: AutoscalingConfig | None = Field(default=None, description=(
        "the web group's min/desired/max and target; without it, min = desired = max = servers.web"))

    @model_validator(mode="after")
    def _web_group(self):
        group = self.autoscaling
        if group is None:
            return self
        if group.max is None:
            group.max = max(group.min, group.desired or self.servers.web)
        if group.desired is None:
            group.desired = min(max(self.servers.web, group.min), group.max)
        if not group.min <= group.desired <= group.max:
            raise ValueError(f"autoscaling: min <= desired <= max is needed (got min={group.min}, "
                             f"desired={group.desired}, max={group.max})")
        if group.target is None:
            group.target = float(self.gunicorn_workers if group.metric == "sessions" else 10 * self.gunicorn_workers)
        subnet = self.subnet or ipaddress.IPv4Network("10.213.0.0/24")
        others = self.servers.total() - self.servers.web
        usable = subnet.num_addresses - UNSERVED_ADDRESSES
        # a replacement or a serial deploy has one web server more than max for a while
        if usable < others + group.max + 1:
            raise ValueError(f"autoscaling.max: {group.max} web servers (and one more while one is replaced) "
                             f"and {others} other servers need {others + group.max + 1} addresses, but subnet "
                             f"{subnet} holds {max(usable, 0)}: lower max or use a larger subnet")
        return self

    def web_group(self) -> AutoscalingConfig:
        """The web group's settings; without `autoscaling`, a fixed group of servers.web."""
        if self.autoscaling is not None:
            return self.autoscaling
        web = self.servers.web
        return AutoscalingConfig(min=web, desired=web, max=web, target=float(self.gunicorn_workers))

    @model_validator(mode="after")
    def _pool_fits(self):
        if self.subnet is not None:
            usable = self.subnet.num_addresses - RESERVED_ADDRESSES
            if usable < self.servers.total():
                raise ValueError(
                    f"subnet {self.subnet} holds {max(usable, 0)} server addresses but "
                    f"{self.servers.total()} servers are asked for: use a larger subnet (e.g. a /24)")
        return self


class ProjectConfig(Strict):
    project: Annotated[str, Field(pattern=SLUG)]
    app: AppConfig
    environments: dict[str, EnvironmentConfig]

    @field_validator("environments")
    @classmethod
    def _env_names(cls, value: dict[str, EnvironmentConfig]):
        if not value:
            raise ValueError("define at least one environment")
        for name in value:
            if not re.match(SLUG, name):
                raise ValueError(f"environment name {name!r} must match {SLUG} (lower case, digits, '-')")
        return value


class LoadedConfig(BaseModel):
    """The validated configuration together with where it came from."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    path: Path
    project: ProjectConfig

    @property
    def source_dir(self) -> Path:
        return (self.path.parent / self.project.app.source).resolve()

    def environment(self, name: str) -> EnvironmentConfig:
        try:
            return self.project.environments[name]
        except KeyError:
            known = ", ".join(sorted(self.project.environments))
            raise ConfigError(f"{self.path}: no environment {name!r} under `environments`",
                              f"use one of: {known}") from None


def _key_path(loc: tuple) -> str:
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _explain(error: dict) -> str:
    kind, msg = error["type"], error["msg"]
    loc = list(error["loc"])
    if kind == "extra_forbidden":
        if len(loc) >= 2 and loc[-2] == "servers":
            return f"unknown role {loc[-1]!r}: expected one of {', '.join(ROLES)}"
        return f"unknown key {loc[-1]!r}: remove it or check its spelling"
    if kind == "missing":
        return "required key is missing"
    if kind == "greater_than_equal" and len(loc) >= 2 and loc[-2] == "servers":
        return f"at least {error['ctx']['ge']} {loc[-1]} server(s) are needed (got {error.get('input')})"
    msg = msg.removeprefix("Value error, ")
    return f"{msg} (got {error.get('input')!r})" if kind not in ("value_error", "model_type") else msg


def load_config(path: Path) -> LoadedConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file", "run fabula in the folder holding fabula.yml, or pass -c PATH")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with `project`, `app` and `environments`")
    try:
        project = ProjectConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{path}: {_key_path(e['loc'])}: {_explain(e)}" for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None
    loaded = LoadedConfig(path=path.resolve(), project=project)
    if not loaded.source_dir.is_dir():
        raise ConfigError(f"{path}: app.source: folder {loaded.source_dir} does not exist")
    return loaded
