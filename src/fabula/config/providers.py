"""Each provider's own section of an environment (`local:`, `ssh:` and the inventory of
`hosts:`), one per provider: a new provider adds its own here."""
from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    field_validator,
    model_validator,
)

from fabula.addressing import LARGEST_PREFIX, SMALLEST_PREFIX
from fabula.config.values import RFC1918, HostName, Port, SafePath, Strict, excerpt, pattern, unsafe_character


def _unicast(value: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
    if value.is_multicast or value.is_unspecified or value.is_reserved or value == ipaddress.IPv4Address(
            "255.255.255.255"):
        raise ValueError(f"a unicast address of this machine is expected, such as 127.0.0.1 (got {value})")
    return value

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
UserName = Annotated[str, pattern(USER_NAME, "a Unix user name (lower case, digits, '_', '-')")]
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
    jump: Annotated[str, Field(max_length=300), pattern(JUMP, "a jump host `[user@]host[:port]`")] | None = None
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
ServerName = Annotated[str, pattern(r"[a-z][a-z0-9-]{0,30}", "a server name (lower case, digits, '-')")]
# each inventory role and how many hosts may carry it
INVENTORY_LIMITS = {"lb": (1, 1), "web": (1, 32), "worker": (0, 1), "cache": (1, 1), "db-primary": (1, 1),
                    "db-replica": (0, 4)}

# each provider's own section, by the name `provider:` gives (one section per provider; the
# aws provider adds its own)
PROVIDER_SECTIONS = ("local", "ssh")

