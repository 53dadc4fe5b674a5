"""The schema of fabula.yml: the app, each environment (its servers, load balancer, database,
web group and provider section) and the project."""
from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from fabula.addressing import server_capacity
from fabula.config.providers import (
    INVENTORY_LIMITS,
    AwsConfig,
    InventoryHost,
    LocalConfig,
    ServerName,
    SshConfig,
    SysadminUser,
    aws_capacity,
)
from fabula.config.values import (
    ROLES,
    SLUG,
    DottedCallable,
    DottedName,
    HostName,
    Port,
    SafePath,
    SafeText,
    Slug,
    Strict,
    excerpt,
    key_error,
)
from fabula.errors import ConfigError


class AppConfig(Strict):
    source: SafePath = Field(default=Path("."), description="the Django project's folder, in a git repository")
    wsgi: DottedCallable
    settings: DottedName
    requirements: SafeText = "requirements.txt"
    celery: DottedCallable | None = None
    manage: SafeText = "manage.py"
    maintenance_page: SafePath | None = Field(default=None, description=(
        "HTML file (relative to the config) served with status 503 during maintenance"))
    python: SafeText = Field(default="/usr/bin/python3", description="interpreter the app's virtualenv is built on")


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
    """The load balancer, whatever the provider: its ports and its TLS certificate."""

    https_port: Port = 8443
    http_port: Port = 8080
    certificate: SafePath | None = Field(default=None, description=(
        "PEM certificate (chain), relative to the config's folder; self-signed when absent"))
    key: SafePath | None = Field(default=None, description="its PEM private key (unencrypted)")

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
    backups: SafePath | None = Field(default=None, description=(
        "folder of `fabula db backup` (an absolute path): on this machine, default <state root>/backups/"
        "<project>/<env>; with `backups_host`, on that host, default /srv/fabula/backups/<project>/<env>"))
    backups_host: ServerName | None = Field(default=None, description=(
        "`provider: ssh`: the host of `hosts:` that keeps the backups (not the load balancer's); "
        "default: this machine"))


class AutoscalingConfig(Strict):
    """The web tier as an autoscaling group: how many web servers, and what demand each takes."""

    min: Annotated[int, Field(ge=1, le=64)] = 1
    desired: Annotated[int, Field(ge=1, le=64)] | None = Field(default=None, description=(
        "web servers to start with; default servers.web (within min..max)"))
    max: Annotated[int, Field(ge=1, le=64)] | None = Field(default=None, description="default: desired")
    metric: Literal["sessions", "requests"] = Field(default="sessions", description=(
        "demand per in-service web server: `sessions` (requests in progress, HAProxy's scur) or "
        "`requests` (requests per second)"))
    target: Annotated[float, Field(gt=0, le=1e9, allow_inf_nan=False)] | None = Field(default=None, description=(
        "the demand per web server the group keeps to; default gunicorn_workers sessions, or "
        "10 x gunicorn_workers requests/s"))
    scale_out_cooldown: Annotated[float, Field(ge=0, le=86400, allow_inf_nan=False)] = 30
    scale_in_cooldown: Annotated[float, Field(ge=0, le=86400, allow_inf_nan=False)] = 60
    health_grace: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = 15
    interval: Annotated[float, Field(ge=0.5, le=300, allow_inf_nan=False)] = 2
    window: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] = Field(default=10, description=(
        "seconds the demand is averaged over before it is compared with the target"))
    warm: Annotated[int, Field(ge=0, le=8)] = Field(default=0, description=(
        "web servers kept started from the group's release, out of the load balancer, so that a scale-out or "
        "the replacement of a failed server puts one in service at once (an Auto Scaling group's warm pool); "
        "each costs a web server's memory"))



class EnvironmentConfig(Strict):
    provider: Literal["local", "ssh", "aws"] = "local"
    local: LocalConfig = LocalConfig()
    ssh: SshConfig | None = None
    aws: AwsConfig | None = None
    production: bool = Field(default=False, description="refuse destructive copies into it without --force")
    db: DatabaseConfig = DatabaseConfig()
    servers: ServerCounts = ServerCounts()
    lb: LoadBalancerConfig = LoadBalancerConfig()
    domains: Annotated[list[HostName], Field(max_length=100)] = Field(
        default_factory=list, description="the site's names: DJANGO_ALLOWED_HOSTS, and where the HTTP port "
        "redirects to")
    hosts: Annotated[dict[ServerName, InventoryHost], Field(max_length=64)] = Field(
        default_factory=dict, description="`provider: ssh`: the servers, each {role, address}")
    admin_sources: Annotated[list[ipaddress.IPv4Network | ipaddress.IPv6Network], Field(max_length=64)] = Field(
        default_factory=list, description="`provider: ssh` and `aws`: networks that may reach SSH on every host "
        "(on ssh, besides the machine fabula runs on)")
    users: Annotated[list[SysadminUser], Field(max_length=64)] = Field(
        default_factory=list, description="`provider: ssh`: sysadmin accounts on every host")
    gunicorn_workers: Annotated[int, Field(ge=1, le=64)] = 2
    gunicorn_preload: bool = Field(default=True, description=(
        "gunicorn imports the app once and forks its workers from it (--preload): a web server starts on "
        "less CPU and memory. Turn it off for an app that opens connections or starts threads when its WSGI "
        "module is imported (they would be shared by the forked workers)"))
    celery_concurrency: Annotated[int, Field(ge=1, le=64)] = 2
    celery_drain_timeout: Annotated[int, Field(ge=1, le=86400, description=(
        "seconds a stopping Celery worker may take to finish the tasks in flight"))] = 600
    autoscaling: AutoscalingConfig | None = Field(default=None, description=(
        "the web group's min/desired/max and target; without it, min = desired = max = servers.web"))

    @model_validator(mode="before")
    @classmethod
    def _former_spellings(cls, data: Any):
        """`subnet` at the environment's level and `lb.bind` were local-only keys before the
        provider sections: still read, as `local.subnet` and `local.bind`."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("hosts"), list):  # `hosts` was the list of site names: now `domains`
            if "domains" in data:
                raise ValueError("give the site's names once, as `domains:` (the list under `hosts:` is their "
                                 "former spelling; `hosts:` is now the ssh provider's servers)")
            data["domains"] = data.pop("hosts")
        moved = {}
        if "subnet" in data:
            moved["subnet"] = data.pop("subnet")
        lb = data.get("lb")
        if isinstance(lb, dict) and "bind" in lb:
            data["lb"] = {k: v for k, v in lb.items() if k != "bind"}
            moved["bind"] = lb["bind"]
        if moved:
            local = data.get("local")
            if local is None:
                local = {}
            if not isinstance(local, dict):
                return data  # the section's own type error says what is wrong
            twice = sorted(set(moved) & set(local))
            if twice:
                raise ValueError(f"`{twice[0]}` is given twice: write it once, under `local:` "
                                 f"(local: {{{twice[0]}: ...}})")
            data["local"] = {**local, **moved}
        return data

    @property
    def subnet(self) -> ipaddress.IPv4Network | None:
        return self.local.subnet if self.provider == "local" else None

    @property
    def fixed_inventory(self) -> bool:
        """The servers are given (`hosts:`), not made: the web group cannot grow or shrink."""
        return self.provider == "ssh"

    @model_validator(mode="before")
    @classmethod
    def _provider_keys(cls, data: Any):
        """Each provider's keys only under that provider: a key of another one is a mistake."""
        if not isinstance(data, dict):
            return data
        provider = data.get("provider", "local")
        # (a list under `hosts` is the former spelling of `domains`)
        given = [k for k in ("ssh", "hosts", "admin_sources", "users")
                 if data.get(k) is not None and not (k == "hosts" and isinstance(data[k], list))]
        # an aws environment's instances are reached over SSH too, but are made, not listed
        ssh_only = [k for k in given if provider != "ssh" and not (provider == "aws" and k in ("ssh", "admin_sources"))]
        if ssh_only:
            owners = "`provider: ssh` and `provider: aws`" if ssh_only[0] in ("ssh", "admin_sources") else \
                "`provider: ssh`"
            raise ValueError(f"`{ssh_only[0]}` is a key of {owners} (this environment's provider is "
                             f"{excerpt(provider)})")
        if provider != "aws" and data.get("aws") is not None:
            raise ValueError(f"`aws` is the section of `provider: aws` (this environment's provider is "
                             f"{excerpt(provider)})")
        if provider == "aws":
            return cls._aws_keys(data)
        if provider == "ssh":
            if "local" in data or "subnet" in data:
                raise ValueError("`local` (and `subnet`) are keys of `provider: local`; an ssh environment's "
                                 "servers are its `hosts`")
            if "servers" in data:
                raise ValueError("an ssh environment's servers are its `hosts` (each with its role): leave "
                                 "`servers:` out")
            if "autoscaling" in data:
                raise ValueError("a fixed inventory (`provider: ssh`) cannot scale: leave `autoscaling:` out and "
                                 "list the web hosts under `hosts:`")
            if not isinstance(data.get("hosts"), dict) or not data["hosts"]:
                raise ValueError("`provider: ssh` needs `hosts:`, a mapping of server name to "
                                 "{role, address}, e.g. web1: {role: web, address: 10.0.0.11}")
        return data

    @classmethod
    def _aws_keys(cls, data: dict) -> dict:
        if "local" in data or "subnet" in data:
            raise ValueError("`local` (and `subnet`) are keys of `provider: local`; an aws environment's "
                             "addresses are its VPC's (aws: {vpc: {cidr: ...}})")
        if not isinstance(data.get("aws"), dict):
            raise ValueError("`provider: aws` needs its `aws:` section: at least region, vpc and state_bucket, "
                             "e.g. aws: {region: eu-west-1, vpc: {cidr: 10.40.0.0/16}, state_bucket: NAME}")
        if not data.get("admin_sources"):
            raise ValueError("`provider: aws` needs `admin_sources`: the networks that may reach the instances' "
                             "SSH, among them this machine's public address or the jump host's "
                             "(e.g. admin_sources: [198.51.100.7/32])")
        data = dict(data)
        # the load balancer of AWS listens where browsers knock, unless told otherwise
        lb = data.get("lb")
        if lb is None or isinstance(lb, dict):
            data["lb"] = {"https_port": 443, "http_port": 80, **(lb or {})}
        group = data.get("autoscaling")
        if isinstance(group, dict):
            if group.get("metric", "requests") != "requests":
                raise ValueError("autoscaling.metric: an Auto Scaling group tracks requests per target "
                                 "(ALBRequestCountPerTarget): use `metric: requests` on `provider: aws`")
            if group.get("warm"):
                raise ValueError("autoscaling.warm: the Auto Scaling group's warm pool is not used by fabula yet: "
                                 "leave `warm` out on `provider: aws`")
            data["autoscaling"] = {**group, "metric": "requests"}
        return data

    @model_validator(mode="after")
    def _inventory(self):
        if self.provider != "ssh":
            return self
        if self.ssh is None:
            self.ssh = SshConfig()
        by_role: dict[str, list[str]] = {role: [] for role in INVENTORY_LIMITS}
        for name, host in self.hosts.items():
            by_role[host.role].append(name)
        for role, (low, high) in INVENTORY_LIMITS.items():
            count = len(by_role[role])
            if not low <= count <= high:
                wanted = f"exactly {low}" if low == high else f"{low} to {high}"
                raise ValueError(f"hosts: {wanted} host(s) with role {role} are expected (got {count}"
                                 + (f": {', '.join(by_role[role])}" if by_role[role] else "") + ")")
        seen: dict[str, str] = {}
        for name, host in self.hosts.items():
            if host.address.lower() in seen:
                raise ValueError(f"hosts: {name} and {seen[host.address.lower()]} have the same address "
                                 f"{host.address}: a host carries one role, give each its own host")
            seen[host.address.lower()] = name
        names = [u.name for u in self.users]
        if len(set(names)) != len(names):
            raise ValueError("users: each name once")
        # the counts the rest of fabula plans with, from the inventory
        self.servers = ServerCounts.model_validate({role: len(by_role[role]) for role in ROLES})
        return self

    @model_validator(mode="after")
    def _backups_host(self):
        name = self.db.backups_host
        if name is None:
            return self
        if self.provider != "ssh":
            raise key_error("db.backups_host", f"`db.backups_host` is a key of `provider: ssh` (this "
                            f"environment's provider is {self.provider}, whose backups are kept on this machine, "
                            "in `db.backups`)")
        behind = sorted(n for n, h in self.hosts.items() if h.role != "lb")
        if name not in self.hosts:
            raise key_error("db.backups_host", f"{name} is not a host of `hosts:`: name the one that keeps the "
                            f"backups (one of: {', '.join(behind)})")
        if self.hosts[name].role == "lb":
            raise key_error("db.backups_host", f"{name} is the load balancer's host, the one the internet "
                            "reaches: a dump holds every row of the app's data, so it is kept on a host behind "
                            f"it (one of: {', '.join(behind)})")
        return self

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
        return self

    def web_group(self) -> AutoscalingConfig:
        """The web group's settings; without `autoscaling`, a fixed group of servers.web."""
        if self.autoscaling is not None:
            return self.autoscaling
        web = self.servers.web
        return AutoscalingConfig(min=web, desired=web, max=web, target=float(self.gunicorn_workers))

    def addresses_needed(self) -> int:
        """Server addresses the environment can use at once: the other servers, the web group's
        max, and one web server more while one is replaced (a serial deploy, self-healing)."""
        group = self.web_group()
        assert group.max is not None
        return self.servers.total() - self.servers.web + group.max + group.warm + 1

    @model_validator(mode="after")
    def _pool_fits(self):
        if self.provider != "local":
            return self
        subnet = self.subnet or ipaddress.IPv4Network("10.213.0.0/24")  # the size of an automatic one
        capacity, needed = server_capacity(subnet), self.addresses_needed()
        if capacity < needed:
            others, group_max = self.servers.total() - self.servers.web, self.web_group().max
            if self.autoscaling is not None:
                raise ValueError(f"autoscaling.max: {group_max} web servers (and one more while one is replaced, "
                                 f"and the warm pool's) and {others} other servers need {needed} addresses, but "
                                 f"subnet {subnet} holds {capacity}: lower max or use a larger subnet")
            raise ValueError(f"subnet {subnet} holds {capacity} server addresses but {needed} are needed "
                             f"({self.servers.total()} servers, and one web server more while one is replaced): "
                             "use a larger subnet (e.g. a /24)")
        return self

    @model_validator(mode="after")
    def _aws(self):
        if self.provider != "aws":
            return self
        assert self.aws is not None  # _aws_keys requires the section
        if self.ssh is None:
            self.ssh = SshConfig(user="admin")  # the Debian images' own user, with passwordless sudo
        cidr = self.aws.vpc.cidr
        if cidr is not None and aws_capacity(cidr) < self.addresses_needed():
            raise ValueError(f"aws.vpc.cidr: {cidr}'s two subnets hold {aws_capacity(cidr)} instances but "
                             f"{self.addresses_needed()} are needed (the servers, the web group's max, and one "
                             "web server more while one is replaced): use a larger VPC, e.g. a /24")
        return self


class ProjectConfig(Strict):
    project: Slug
    app: AppConfig
    environments: dict[str, EnvironmentConfig]

    @field_validator("environments", mode="before")
    @classmethod
    def _env_names(cls, value: Any):
        if isinstance(value, dict):
            if not value:
                raise ValueError("define at least one environment")
            if len(value) > 64:
                raise ValueError(f"at most 64 environments are expected (got {len(value)})")
            compiled = re.compile(SLUG, re.ASCII)
            for name in value:
                if not isinstance(name, str) or not compiled.fullmatch(name):
                    raise ValueError(f"environment name {excerpt(name)} must match {SLUG} "
                                     "(lower case, digits, '-'; at most 20 characters)")
        return value

    @model_validator(mode="after")
    def _environments_apart(self):
        """No two environments of the file share an address: subnets, and the load balancer's
        bind:port pairs."""
        subnets = sorted((env.subnet, name) for name, env in self.environments.items() if env.subnet)
        for (a, a_name), (b, b_name) in zip(subnets, subnets[1:], strict=False):
            if a.overlaps(b):
                raise ValueError(f"environments {a_name} and {b_name}: subnets {a} and {b} overlap: give each "
                                 "environment a subnet of its own (or leave `subnet` out for a free one)")
        seen: dict[tuple, str] = {}
        for name, env in self.environments.items():
            if env.provider != "local":
                continue
            for key in ("https_port", "http_port"):
                pair = (env.local.bind, getattr(env.lb, key))
                if pair in seen:
                    raise ValueError(f"environments.{name}.lb.{key}: {pair[0]}:{pair[1]} is already "
                                     f"{seen[pair]}: give each environment its own ports")
                seen[pair] = f"environments.{name}.lb.{key}"
        return self


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
            raise ConfigError(f"{self.path}: no environment {excerpt(name)} under `environments`",
                              f"use one of: {known}") from None

