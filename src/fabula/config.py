"""The schema of fabula.yml, loaded and validated once.

Every error names the file, the key path and what is expected, ends with a `fix:` line, and is
raised before anything is created. Nothing of the input is echoed beyond a short excerpt.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import re
import stat
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from fabula.addressing import LARGEST_PREFIX, SMALLEST_PREFIX, server_capacity
from fabula.errors import ConfigError

ROLES = ("web", "worker", "cache", "db-primary", "db-replica")
# patterns are matched whole (re.fullmatch, ASCII only): "testing\n" is not a name
SLUG = r"[a-z][a-z0-9-]{0,19}"
DOTTED_CALLABLE = r"[A-Za-z_][A-Za-z0-9_.]*(:[A-Za-z_][A-Za-z0-9_]*)?"
DOTTED_NAME = r"[A-Za-z_][A-Za-z0-9_.]*"
MAX_CONFIG_BYTES = 1 << 20   # fabula.yml is a few hundred bytes; more is a mistake
MAX_DEPTH = 32               # fabula.yml nests 4 levels deep
MAX_NUMBER_CHARS = 64        # a number written with more characters than this is no count or port
EXCERPT = 80                 # characters of an input value an error message may show
MAX_ERRORS = 10              # errors listed in one message
MAX_PEM_BYTES = 1 << 20
RFC1918 = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
# directories that belong to the system: db.backups and app.source may be none of them (nor be
# inside the first set)
SYSTEM_TREES = ("/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/boot", "/dev",
                "/proc", "/sys", "/run", "/var/run", "/var/lock", "/var/tmp", "/var/log", "/var/spool",
                "/var/cache", "/var/mail")
SYSTEM_DIRS = ("/", "/var", "/tmp", "/root", "/home", "/opt", "/srv", "/mnt", "/media", "/snap",
               "/var/lib", "/var/backups", "/var/opt", "/var/local", "/usr/local", "/lost+found")
PYTHON_NAME = r"python3(\.[0-9]{1,3})?"


def excerpt(value: Any, limit: int = EXCERPT) -> str:
    """repr(value), cut to `limit` characters: error messages never grow with the input."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    except Exception:  # noqa: BLE001 - only for the message
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def cut(text: str, limit: int) -> str:
    """Text of ours (that may quote the input) for a message: printable, at most `limit` characters."""
    if not text.replace("\n", " ").isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else text[:limit] + "..."


def shown_path(path: Path | str, limit: int = 160) -> str:
    """A path for a message: printable, and at most `limit` characters (its end kept)."""
    text = str(path)
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else "..." + text[-limit:]


# -- strings that end up in configuration files ---------------------------------------------------

def unsafe_character(value: str) -> str | None:
    """The first character that may not be in a value fabula writes into a configuration file
    (supervisor, INI, nginx, HAProxy...): control characters (newlines included), quotes,
    backslashes and backquotes; None when there is none."""
    for char in value:
        if char in "\"'\\`" or unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            return char
    return None


def _safe_text(value: str) -> str:
    char = unsafe_character(value)
    if char is not None:
        raise ValueError(f"{excerpt(char)} is not allowed here (no control characters, newlines, quotes "
                         f"or backslashes; got {excerpt(value)})")
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _safe_path_text(value: Any) -> Any:
    if isinstance(value, str):
        if len(value) > 1024:
            raise ValueError(f"a path of at most 1024 characters is expected (got {len(value)})")
        _safe_text(value)
    return value


def _pattern(regex: str, what: str):
    compiled = re.compile(regex, re.ASCII)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"{what} is expected, matching {regex} (got {excerpt(value)})")
        return value
    return AfterValidator(check)


HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", re.ASCII)


def _host_name(value: str) -> str:
    """An RFC 1123 host name (a leading `.` allowed: Django's ALLOWED_HOSTS subdomain wildcard),
    or an IP address."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    name = value[1:] if value.startswith(".") else value
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    if len(name) > 253 or not all(HOST_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise ValueError(f"a host name (letters, digits and '-' in dot-separated labels) or an IP address "
                         f"is expected (got {excerpt(value)})")
    return value


SafeText = Annotated[str, Field(max_length=1024), AfterValidator(_safe_text)]
SafePath = Annotated[Path, BeforeValidator(_safe_path_text)]
Slug = Annotated[str, _pattern(SLUG, "a name of lower-case letters, digits and '-' (at most 20)")]
DottedCallable = Annotated[str, Field(max_length=255),
                           _pattern(DOTTED_CALLABLE, "a Python path like `pkg.module:name`")]
DottedName = Annotated[str, Field(max_length=255), _pattern(DOTTED_NAME, "a Python module path like `pkg.settings`")]
HostName = Annotated[str, Field(max_length=253), AfterValidator(_host_name)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


Port = Annotated[int, Field(ge=1, le=65535)]


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


def _unicast(value: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
    if value.is_multicast or value.is_unspecified or value.is_reserved or value == ipaddress.IPv4Address(
            "255.255.255.255"):
        raise ValueError(f"a unicast address of this machine is expected, such as 127.0.0.1 (got {value})")
    return value


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
    backups: SafePath | None = Field(default=None, description="folder for `fabula db backup` (an absolute "
                                     "path); default <state root>/backups/<project>-<env>")


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


def _subnet_range(value: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    if not any(value.subnet_of(private) for private in RFC1918):
        raise ValueError(f"subnet {value} is not a private network: use one inside 10.0.0.0/8, "
                         "172.16.0.0/12 or 192.168.0.0/16 (RFC 1918)")
    if not LARGEST_PREFIX <= value.prefixlen <= SMALLEST_PREFIX:
        raise ValueError(f"subnet {value}: a prefix length from /{LARGEST_PREFIX} to /{SMALLEST_PREFIX} is "
                         "expected (a /24 holds 245 servers)")
    return value


class LocalConfig(Strict):
    """`provider: local`: every server a network namespace of this machine, HAProxy in the
    machine's own namespace."""

    subnet: Annotated[ipaddress.IPv4Network, AfterValidator(_subnet_range)] | None = Field(
        default=None, description="addresses for the servers; a free /24 in 10.213.0.0/16 when absent")
    bind: Annotated[ipaddress.IPv4Address, AfterValidator(_unicast)] = Field(
        default=ipaddress.IPv4Address("127.0.0.1"), description="the machine's address the load balancer listens on")


USER_NAME = r"[a-z_][a-z0-9_-]{0,31}"
# a "[user@]host[:port]" ProxyJump
JUMP = r"([a-z_][a-z0-9_-]{0,31}@)?[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?"
SSH_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
                 "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")
PUBLIC_KEY = re.compile(r"(?P<type>[a-z0-9@.-]{1,64}) (?P<data>[A-Za-z0-9+/]{16,16384}={0,3})( [ -~]{0,256})?",
                        re.ASCII)
UserName = Annotated[str, _pattern(USER_NAME, "a Unix user name (lower case, digits, '_', '-')")]
# fabula's own system users are fb-<tag>-...; a sysadmin may not be root or take one of those names
RESERVED_USERS = ("root", "daemon", "bin", "sys", "nobody", "postgres", "www-data", "redis", "rabbitmq",
                  "haproxy", "pgbouncer", "sshd")


def _public_key(value: str) -> str:
    match = PUBLIC_KEY.fullmatch(value.strip())
    if not match or match["type"] not in SSH_KEY_TYPES or unsafe_character(value):
        raise ValueError(f"an OpenSSH public key on one line (`ssh-ed25519 AAAA... comment`, the content of a "
                         f"~/.ssh/*.pub file) is expected (got {excerpt(value)})")
    return value.strip()


PublicKey = Annotated[str, Field(max_length=17000), AfterValidator(_public_key)]


class SshConfig(Strict):
    """`provider: ssh`: how fabula reaches the hosts of `hosts:`."""

    user: UserName = Field(default="root", description="root, or a user with passwordless sudo")
    key: SafePath | None = Field(default=None, description=(
        "private key file (`~` and paths relative to fabula.yml's folder); default: the ssh agent and ~/.ssh's keys"))
    port: Port = 22
    jump: Annotated[str, Field(max_length=300), _pattern(JUMP, "a jump host `[user@]host[:port]`")] | None = None
    known_hosts: SafePath | None = Field(default=None, description=(
        "where host keys are recorded and checked (default ~/.ssh/known_hosts); `fabula trust ENV` records them"))


class InventoryHost(Strict):
    role: Literal["lb", "web", "worker", "cache", "db-primary", "db-replica"]
    address: HostName

    @model_validator(mode="before")
    @classmethod
    def _one_role(cls, data: Any):
        if isinstance(data, dict) and isinstance(data.get("role"), list | tuple):
            raise ValueError("a host carries one role: give each role a host of its own (e.g. web1 and worker1 "
                             "with their own addresses)")
        return data


class SysadminUser(Strict):
    """A sysadmin account on every host of the environment, with its keys and passwordless sudo."""

    name: UserName
    keys: Annotated[list[PublicKey], Field(min_length=1, max_length=32)]

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_USERS or value.startswith("fb-"):
            raise ValueError(f"{value} is a system user's name (or fabula's own fb-*): choose another")
        return value


# inventory names are server names: the same pattern as the local provider's web1, db2...
ServerName = Annotated[str, _pattern(r"[a-z][a-z0-9-]{0,30}", "a server name (lower case, digits, '-')")]
# each inventory role and how many hosts may carry it
INVENTORY_LIMITS = {"lb": (1, 1), "web": (1, 32), "worker": (0, 1), "cache": (1, 1), "db-primary": (1, 1),
                    "db-replica": (0, 4)}

# each provider's own section, by the name `provider:` gives (one section per provider; the
# aws provider adds its own)
PROVIDER_SECTIONS = ("local", "ssh")


class EnvironmentConfig(Strict):
    provider: Literal["local", "ssh"] = "local"
    local: LocalConfig = LocalConfig()
    ssh: SshConfig | None = None
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
        default_factory=list, description="`provider: ssh`: networks that may reach SSH on every host (besides "
        "the machine fabula runs on)")
    users: Annotated[list[SysadminUser], Field(max_length=64)] = Field(
        default_factory=list, description="`provider: ssh`: sysadmin accounts on every host")
    gunicorn_workers: Annotated[int, Field(ge=1, le=64)] = 2
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
        ssh_only = [k for k in ("ssh", "hosts", "admin_sources", "users")
                    if data.get(k) is not None and not (k == "hosts" and isinstance(data[k], list))]
        if provider != "ssh" and ssh_only:
            raise ValueError(f"`{ssh_only[0]}` is a key of `provider: ssh` (this environment's provider is "
                             f"{excerpt(provider)})")
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
        group_max = self.web_group().max
        assert group_max is not None
        return self.servers.total() - self.servers.web + group_max + 1

    @model_validator(mode="after")
    def _pool_fits(self):
        if self.provider != "local":
            return self
        subnet = self.subnet or ipaddress.IPv4Network("10.213.0.0/24")  # the size of an automatic one
        capacity, needed = server_capacity(subnet), self.addresses_needed()
        if capacity < needed:
            others, group_max = self.servers.total() - self.servers.web, self.web_group().max
            if self.autoscaling is not None:
                raise ValueError(f"autoscaling.max: {group_max} web servers (and one more while one is replaced) "
                                 f"and {others} other servers need {needed} addresses, but subnet {subnet} "
                                 f"holds {capacity}: lower max or use a larger subnet")
            raise ValueError(f"subnet {subnet} holds {capacity} server addresses but {needed} are needed "
                             f"({self.servers.total()} servers, and one web server more while one is replaced): "
                             "use a larger subnet (e.g. a /24)")
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


# -- reading: bytes -> text -> YAML ----------------------------------------------------------------

class _Refused(yaml.MarkedYAMLError):
    pass


# what a tag's value must be, for the message that refuses one that is not
TAG_MEANINGS = {"int": "an integer", "float": "a number", "bool": "true or false", "null": "null",
                "timestamp": "a date or time (e.g. 2001-02-28, 2001-02-28 10:00:00)",
                "binary": "base64-encoded bytes"}


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without what fabula.yml never needs and what makes a small file
    expensive or ambiguous: no anchors or aliases (a "billion laughs" file), no merge keys, no
    duplicate keys, no deep nesting, no numbers thousands of digits long."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(None, None, f"alias *{excerpt(event.anchor, 40)[1:-1]}: anchors and aliases are "
                           "not allowed in fabula.yml", event.start_mark)
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:
            raise _Refused(None, None, f"anchor &{excerpt(event.anchor, 40)[1:-1]}: anchors and aliases are "
                           "not allowed in fabula.yml", event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(None, None, f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if not isinstance(node, yaml.MappingNode):
            return super().construct_mapping(node, deep=deep)
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _Refused("while reading a mapping", node.start_mark,
                               "merge keys (<<) are not allowed in fabula.yml", key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise _Refused("while reading a mapping", node.start_mark,
                               "a key must be a plain value, not a list or mapping", key_node.start_mark) from None
            if key in seen:
                raise _Refused("while reading a mapping", node.start_mark,
                               f"duplicate key {excerpt(key, 40)} (first at line {seen[key].line + 1}): "
                               "each key may appear once", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node, deep=False):
        """PyYAML's constructors raise plain Python errors for a scalar they cannot read (a 30th of
        February, `!!int ""`, `!!bool maybe`, `!!timestamp foo`): refused here, at the value's place."""
        try:
            return super().construct_object(node, deep=deep)
        except (yaml.YAMLError, RecursionError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - whatever a constructor raises for a bad value
            tag = node.tag.removeprefix("tag:yaml.org,2002:")
            what = TAG_MEANINGS.get(tag, f"a value of tag {node.tag}")
            value = excerpt(node.value, 40) if isinstance(node, yaml.ScalarNode) else f"this {node.id}"
            reason = cut(str(exc), 80) if isinstance(exc, ValueError) else ""
            raise _Refused(None, None, f"{value} is not {cut(what, 80)}" + (f" ({reason})" if reason else ""),
                           node.start_mark) from None

    def _short_number(self, node):
        if len(node.value) > MAX_NUMBER_CHARS:
            raise _Refused(None, None, f"a number of {len(node.value)} characters", node.start_mark)

    def construct_yaml_int(self, node):
        self._short_number(node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node):
        self._short_number(node)
        return super().construct_yaml_float(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)


NO_FILE_HINT = "run fabula in the folder holding fabula.yml, or pass -c PATH"


def read_regular_file(path: Path, limit: int, what: str, shown: str, hint: str) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes: never blocks on
    a FIFO or device, never reads without end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise ConfigError(f"{shown}: no such file", hint) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        if getattr(exc, "errno", None) == errno.EISDIR:
            reason = f"is a directory, not {what}"
        raise ConfigError(f"{shown}: cannot read {what}: {reason}", hint) from None
    try:
        return read_open_file(fd, limit, what, shown, hint)
    finally:
        os.close(fd)


def read_open_file(fd: int, limit: int, what: str, shown: str, hint: str) -> bytes:
    """The bytes of the file open as `fd` (opened non-blocking), which must be a regular file of at
    most `limit` bytes."""
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{shown}: is a directory, not {what}", hint)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{shown}: is not a regular file (a FIFO, socket or device), not {what}", hint)
        if info.st_size > limit:
            raise ConfigError(f"{shown}: {info.st_size} bytes is too large for {what} (at most {limit})", hint)
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise ConfigError(f"{shown}: too large for {what} (more than {limit} bytes)", hint)
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read {what}: {exc.strerror or exc}", hint) from None


def _parse(path: Path, shown: str) -> Any:
    data = read_regular_file(path, MAX_CONFIG_BYTES, "a fabula.yml", shown, NO_FILE_HINT)
    fix = f"save {shown} as UTF-8 text"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{shown}: is UTF-16 text; fabula.yml must be UTF-8", fix)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{shown}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start}); fabula.yml must be UTF-8", fix) from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise ConfigError(f"{shown}: line {line}: holds a NUL byte; fabula.yml is text", fix)
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{shown}:{where}: invalid YAML: {cut(str(problem), 200)}",
                          f"correct {shown}{' at' + where if where else ''}") from None
    except RecursionError:
        raise ConfigError(f"{shown}: invalid YAML: nested too deeply",
                          f"fabula.yml nests a few levels; correct {shown}") from None


# -- validation errors as messages ----------------------------------------------------------------

def _key_path(loc: tuple) -> str:
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            text = item if isinstance(item, str) and item.isprintable() else excerpt(item, 40)
            parts.append(("." if parts else "") + (text if len(text) <= 40 else excerpt(text, 40)))
    return "".join(parts) or "(top level)"


def _explain(error: ErrorDetails) -> str:
    kind, msg = error["type"], error["msg"]
    loc = list(error["loc"])
    if kind == "extra_forbidden":
        if len(loc) >= 2 and loc[-2] == "servers":
            return f"unknown role {excerpt(loc[-1], 40)}: expected one of {', '.join(ROLES)}"
        return f"unknown key {excerpt(loc[-1], 40)}: remove it or check its spelling"
    if kind == "missing":
        return "required key is missing"
    if kind == "greater_than_equal" and len(loc) >= 2 and loc[-2] == "servers":
        return f"at least {error['ctx']['ge']} {loc[-1]} server(s) are needed (got {excerpt(error.get('input'))})"
    msg = cut(msg.removeprefix("Value error, "), 400)
    return f"{msg} (got {excerpt(error.get('input'))})" if kind not in ("value_error", "model_type") else msg


def _hint(error: ErrorDetails, key: str, shown: str) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"remove `{key}` from {shown}, or correct its spelling"
    if kind == "missing":
        return f"add `{key}` to {shown}"
    return f"correct `{key}` in {shown}"


def _validation_error(exc: ValidationError, shown: str) -> ConfigError:
    errors = exc.errors()
    lines, hints = [], []
    for e in errors[:MAX_ERRORS]:
        key = _key_path(e["loc"])
        lines.append(f"{shown}: {key}: {_explain(e)}" if e["loc"] else f"{shown}: {_explain(e)}")
        hints.append(_hint(e, key, shown) if e["loc"] else f"correct {shown} as said above")
    if len(errors) > MAX_ERRORS:
        lines.append(f"{shown}: ... and {len(errors) - MAX_ERRORS} more errors")
    return ConfigError("\n".join(lines), "; ".join(dict.fromkeys(hints)))


# -- what can only be checked against the machine: files, folders, programs -----------------------

def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a name too long
        return Path(os.path.abspath(path))


def _check_app_file(app: AppConfig, key: str, base: Path, source: Path, relative_only: bool) -> str | None:
    value = getattr(app, key)
    if value is None:
        return None
    path = Path(value)
    if relative_only and path.is_absolute():
        return f"{value} is an absolute path: give it relative to app.source ({shown_path(source)})"
    resolved = _resolve(base / path)
    if not _inside(resolved, source):
        return (f"{shown_path(value)} is outside the app's folder {shown_path(source)} (it resolves to "
                f"{shown_path(resolved)}): it must be a file of the app")
    explicit = key in app.model_fields_set
    if (explicit or resolved.exists()) and not resolved.is_file():
        return f"{shown_path(value)} is not a file in {shown_path(source)}"
    return None


def _check_python(value: str) -> str | None:
    path = Path(value)
    if not path.is_absolute():
        return f"{shown_path(value)}: an absolute path of a Python interpreter is expected, e.g. /usr/bin/python3"
    resolved = _resolve(path)
    try:
        info = resolved.stat()
    except (OSError, ValueError):
        return f"{shown_path(value)} does not exist"
    if not stat.S_ISREG(info.st_mode):
        return f"{shown_path(value)} is not a file"
    if not re.fullmatch(PYTHON_NAME, resolved.name, re.ASCII):
        return (f"{shown_path(value)} resolves to {shown_path(resolved)}, whose name is not python3 or "
                "python3.N: a Python 3 interpreter is expected")
    if not info.st_mode & 0o111:
        return f"{shown_path(resolved)} is not executable"
    if info.st_uid != 0 or info.st_mode & 0o022:
        return (f"{shown_path(resolved)} must be owned by root and writable by no one else (fabula runs it as "
                f"root; owner uid {info.st_uid}, mode {stat.filemode(info.st_mode)})")
    return None


def _system_directory(resolved: Path, trees: tuple[str, ...] = SYSTEM_TREES) -> bool:
    """One of the system's directories, or inside one of its trees."""
    text = str(resolved)
    return text in SYSTEM_DIRS or text in SYSTEM_TREES or any(_inside(resolved, Path(t)) for t in trees)


def _check_backups(value: Path) -> str | None:
    if not value.is_absolute():
        return f"{shown_path(value)}: an absolute path is expected, e.g. /srv/backups/polls"
    resolved = _resolve(value)
    if _system_directory(resolved):
        return (f"{shown_path(value)}" + (f" (resolved: {shown_path(resolved)})" if resolved != value else "")
                + " is a system directory, or inside one: fabula would own it")
    # every folder on the way must be root's and writable by no one else (a sticky /tmp is fine
    # on the way, but not as the folder that would hold a new one)
    existing = resolved
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    for folder in [existing, *existing.parents]:
        info = folder.stat()
        if folder == existing and existing != resolved:
            if not stat.S_ISDIR(info.st_mode):
                return f"{shown_path(folder)} is not a directory"
            if info.st_mode & 0o022 or info.st_uid != 0:
                return (f"{shown_path(resolved)} does not exist and {shown_path(folder)} is writable by others "
                        f"or not root's: create {shown_path(resolved)} first (owned by root, mode 0700)")
            continue
        if folder == resolved:
            if not stat.S_ISDIR(info.st_mode):
                return f"{shown_path(value)} is not a directory"
            if info.st_uid != 0 or info.st_mode & 0o022:
                return (f"{shown_path(resolved)} must be owned by root and writable by no one else (owner uid "
                        f"{info.st_uid}, mode {stat.filemode(info.st_mode)})")
            continue
        if info.st_uid != 0 or (info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX):
            return (f"{shown_path(folder)}, a folder above {shown_path(resolved)}, must be owned by root and "
                    "writable by no one else")
    return None


def _check_tls_pair(env: EnvironmentConfig, base: Path, shown: str, name: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    lb = env.lb
    assert lb.certificate is not None and lb.key is not None
    cert_path, key_path = _resolve(base / lb.certificate), _resolve(base / lb.key)
    where = f"environments.{name}.lb"
    hint = f"in {shown}, point {where}.certificate and {where}.key at a PEM certificate and its unencrypted key"
    cert_pem = read_regular_file(cert_path, MAX_PEM_BYTES, "a PEM certificate", f"{shown}: {where}.certificate: "
                                 f"{shown_path(cert_path)}", hint)
    key_pem = read_regular_file(key_path, MAX_PEM_BYTES, "a PEM private key", f"{shown}: {where}.key: "
                                f"{shown_path(key_path)}", hint)
    try:
        certificate = x509.load_pem_x509_certificates(cert_pem)[0]
    except Exception:  # noqa: BLE001 - cryptography raises ValueError and friends for any bad input
        raise ConfigError(f"{shown}: {where}.certificate: {shown_path(cert_path)} holds no PEM certificate",
                          hint) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(f"{shown}: {where}.key: {shown_path(key_path)} is encrypted: HAProxy needs it "
                          "unencrypted (mode 0600)", hint) from None
    except Exception:  # noqa: BLE001
        raise ConfigError(f"{shown}: {where}.key: {shown_path(key_path)} holds no PEM private key", hint) from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        matches = certificate.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
    except Exception:  # noqa: BLE001 - a key type without a public form
        matches = False
    if not matches:
        raise ConfigError(f"{shown}: {where}: the key {shown_path(key_path)} is not the key of the certificate "
                          f"{shown_path(cert_path)}", hint)
    lb.certificate, lb.key = cert_path, key_path


def _check_machine(loaded: LoadedConfig, shown: str) -> None:
    """Paths and programs named by the configuration, checked against the machine."""
    base, app = loaded.path.parent, loaded.project.app
    source = loaded.source_dir
    fix_source = f"in {shown}, point app.source at the Django project's folder (relative to {shown_path(base)})"
    if not source.is_dir():
        raise ConfigError(f"{shown}: app.source: folder {shown_path(source)} does not exist", fix_source)
    # the app's files (requirements, manage.py, the maintenance page that every web server serves)
    # are checked to lie inside it: with / as the source, /etc/shadow would be one
    # (a folder of the user's in /var/tmp is fine for code; db.backups may not be there)
    if _system_directory(source, trees=tuple(t for t in SYSTEM_TREES if t != "/var/tmp")):
        raise ConfigError(f"{shown}: app.source: {shown_path(source)} is a system directory, or inside one, "
                          "not the Django project's own folder", fix_source)
    problems = []
    for key, folder, relative_only in (("requirements", source, True), ("manage", source, True),
                                       ("maintenance_page", base, False)):
        problem = _check_app_file(app, key, folder, source, relative_only)
        if problem:
            problems.append((f"app.{key}", problem))
    if "python" in app.model_fields_set:
        problem = _check_python(app.python)
        if problem:
            problems.append(("app.python", problem))
    for name, env in loaded.project.environments.items():
        if env.db.backups is not None:
            problem = _check_backups(env.db.backups)
            if problem:
                problems.append((f"environments.{name}.db.backups", problem))
    if problems:
        raise ConfigError("\n".join(f"{shown}: {key}: {problem}" for key, problem in problems),
                          "; ".join(f"correct `{key}` in {shown}" for key, _ in problems))
    if app.maintenance_page is not None:
        app.maintenance_page = _resolve(base / app.maintenance_page)
    for name, env in loaded.project.environments.items():
        if env.lb.certificate is not None:
            _check_tls_pair(env, base, shown, name)
        if env.ssh is not None:
            _check_ssh_files(env.ssh, base, shown, name)


def _check_ssh_files(ssh: SshConfig, base: Path, shown: str, name: str) -> None:
    """`~` and paths relative to fabula.yml's folder made absolute; the key must be readable."""
    for key in ("key", "known_hosts"):
        value = getattr(ssh, key)
        if value is not None:
            setattr(ssh, key, _resolve(base / Path(os.path.expanduser(value))))
    if ssh.key is not None:
        where = f"{shown}: environments.{name}.ssh.key: {shown_path(ssh.key)}"
        read_regular_file(ssh.key, MAX_PEM_BYTES, "an SSH private key", where,
                          f"in {shown}, point environments.{name}.ssh.key at your private key (e.g. "
                          "~/.ssh/id_ed25519), or leave it out to use the ssh agent")


def load_config(path: Path) -> LoadedConfig:
    path = Path(path)
    shown = shown_path(path)
    raw = _parse(path, shown)
    if not isinstance(raw, dict):
        raise ConfigError(f"{shown}: expected a mapping with `project`, `app` and `environments`",
                          f"write {shown} as in the README: `project:`, `app:` and `environments:` at the top level")
    try:
        project = ProjectConfig.model_validate(raw)
    except ValidationError as exc:
        raise _validation_error(exc, shown) from None
    loaded = LoadedConfig(path=_resolve(path), project=project)
    try:
        _check_machine(loaded, shown)
    except (OSError, ValueError) as exc:  # a name too long, a loop of symlinks... on the way to a path
        where = shown_path(getattr(exc, "filename", None) or "a path it names")
        raise ConfigError(f"{shown}: cannot check {where}: {getattr(exc, 'strerror', None) or cut(str(exc), 200)}",
                          f"correct the paths in {shown} (app.source, app.requirements, app.manage, "
                          "app.maintenance_page, app.python, db.backups, lb.certificate, lb.key)") from None
    return loaded
