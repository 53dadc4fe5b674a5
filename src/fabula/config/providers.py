"""Each provider's own section of an environment (`local:`, `ssh:` and the inventory of
`hosts:`), one per provider: a new provider adds its own here."""
from __future__ import annotations

import ipaddress
import re
from pathlib import PurePosixPath
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


# fabula's tree on every host reached over SSH (providers/ssh/preparation.py's TREE): each
# environment's folder is <tree>/<project>/<env>, removed whole by `destroy`; the backups kept on a
# host (db.backups_host) are in <tree>/backups/<project>/<env>, which outlives it
HOST_TREE = PurePosixPath("/srv/fabula")

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
    build: Literal["auto", "here", "worker"] = Field(default="auto", description=(
        "where releases are built: `here` (the machine fabula runs on), `worker` (the worker host, as the app's "
        "user there), or `auto`: here when the web and worker hosts run this machine's Debian release, "
        "architecture and Python, else on the worker host"))


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

# -- provider: aws -----------------------------------------------------------------------------

# a region's name as AWS spells it: eu-west-1, us-gov-west-1, ap-southeast-5, cn-north-1
AWS_REGION = r"[a-z]{2}(-[a-z]{3,5})?-[a-z]{4,9}-[0-9]{1,2}"
VPC_ID = r"vpc-[0-9a-f]{8,17}"
SUBNET_ID = r"subnet-[0-9a-f]{8,17}"
AMI_ID = r"ami-[0-9a-f]{8,17}"
# family (letters, a generation digit, attributes), a size: t3.small, m6i.large, c7gn.16xlarge, mac2-m2.metal
INSTANCE_TYPE = r"(?P<family>[a-z]+-?[0-9][a-z0-9-]{0,12})\.[a-z0-9]{1,16}"
ACM_ARN = r"arn:aws(-cn|-us-gov)?:acm:[a-z]{2}(-[a-z]{3,5})?-[a-z]{4,9}-[0-9]{1,2}:[0-9]{12}:certificate/[0-9a-f-]{36}"
# the smallest VPC that holds two subnets AWS accepts (a /28 each); the largest AWS accepts
VPC_PREFIXES = (16, 27)
AWS_RESERVED_PER_SUBNET = 5   # AWS keeps the first four addresses and the last of every subnet
# what `instance_types` gives each role unless told otherwise (the example)
DEFAULT_INSTANCE_TYPES = {"web": "t3.small", "worker": "t3.small", "cache": "t3.small",
                          "db-primary": "m6i.large", "db-replica": "m6i.large"}


def aws_subnets(vpc: ipaddress.IPv4Network) -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Network]:
    """The two subnets (one per availability zone) fabula carves out of a VPC it makes: the first
    two of prefix /20, or halves of a VPC smaller than a /19."""
    first, second, *_ = vpc.subnets(new_prefix=max(vpc.prefixlen + 1, 20))
    return first, second


def aws_capacity(vpc: ipaddress.IPv4Network) -> int:
    """Instances the two subnets of aws_subnets() hold together."""
    return sum(subnet.num_addresses - AWS_RESERVED_PER_SUBNET for subnet in aws_subnets(vpc))


def _vpc_range(value: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    if not any(value.subnet_of(private) for private in RFC1918):
        raise ValueError(f"{value} is not a private network: use one inside 10.0.0.0/8, 172.16.0.0/12 or "
                         "192.168.0.0/16 (RFC 1918), e.g. 10.40.0.0/16")
    low, high = VPC_PREFIXES
    if not low <= value.prefixlen <= high:
        raise ValueError(f"{value}: a prefix length from /{low} to /{high} is expected (AWS makes VPCs of /16 to "
                         "/28, and fabula splits it into two subnets)")
    return value


def arm64(instance_type: str) -> bool:
    """Graviton (arm64) types: a `g` among the attributes after the generation (t4g, m7gd, c6gn),
    and the first generation, a1."""
    match = re.fullmatch(INSTANCE_TYPE, instance_type, re.ASCII)
    family = match["family"] if match else instance_type
    attributes = re.sub(r"^[a-z]+-?[0-9]+", "", family)
    return "g" in attributes.split("-")[0] or family == "a1"


def _bucket_name(value: str) -> str:
    """S3's rules for a general purpose bucket's name, with dots refused: a dotted name breaks
    the TLS certificate of virtual-hosted addresses."""
    rules = [
        (3 <= len(value) <= 63, "3 to 63 characters"),
        (re.fullmatch(r"[a-z0-9][a-z0-9-]*[a-z0-9]", value, re.ASCII) is not None,
         "lower-case letters, digits and '-', beginning and ending with a letter or digit (no dots)"),
        (not value.startswith(("xn--", "sthree-", "amzn-s3-demo-")), "no prefix xn--, sthree- or amzn-s3-demo-"),
        (not value.endswith(("-s3alias", "--ol-s3", "--x-s3", "--table-s3")),
         "no suffix -s3alias, --ol-s3, --x-s3 or --table-s3"),
    ]
    broken = [rule for ok, rule in rules if not ok]
    if broken:
        raise ValueError(f"an S3 bucket name is expected: {'; '.join(broken)} (got {excerpt(value)})")
    return value


Region = Annotated[str, Field(max_length=30), pattern(AWS_REGION, "an AWS region such as eu-west-1")]
VpcId = Annotated[str, pattern(VPC_ID, "a VPC id such as vpc-0a1b2c3d4e5f67890")]
SubnetId = Annotated[str, pattern(SUBNET_ID, "a subnet id such as subnet-0a1b2c3d4e5f67890")]
AmiId = Annotated[str, pattern(AMI_ID, "an AMI id such as ami-0a1b2c3d4e5f67890")]
InstanceType = Annotated[str, Field(max_length=40), pattern(INSTANCE_TYPE, "an EC2 instance type such as t3.small")]
CertificateArn = Annotated[str, Field(max_length=200), pattern(
    ACM_ARN, "an ACM certificate's ARN (arn:aws:acm:REGION:ACCOUNT:certificate/ID)")]
BucketName = Annotated[str, Field(max_length=63), AfterValidator(_bucket_name)]


class AwsVpc(Strict):
    """The VPC: one fabula makes (`cidr`) or one that exists (`id` and two or more `subnets` of it,
    in different availability zones, which fabula adopts and never removes)."""

    cidr: Annotated[ipaddress.IPv4Network, AfterValidator(_vpc_range)] | None = None
    id: VpcId | None = None
    subnets: Annotated[list[SubnetId], Field(min_length=2, max_length=6)] | None = None

    @model_validator(mode="after")
    def _one_way(self):
        if self.cidr is not None and (self.id is not None or self.subnets is not None):
            raise ValueError("give either `cidr` (a VPC fabula makes) or `id` and `subnets` (one to adopt), "
                             "not both")
        if self.cidr is None and self.id is None:
            raise ValueError("give `cidr` (e.g. {cidr: 10.40.0.0/16}) or `id` and `subnets` of an existing VPC")
        if self.id is not None and self.subnets is None:
            raise ValueError("an adopted VPC needs `subnets`: two or more of its subnets, in different "
                             "availability zones (e.g. [subnet-..., subnet-...])")
        if self.subnets is not None and len(set(self.subnets)) != len(self.subnets):
            raise ValueError("subnets: each subnet once")
        return self


class AwsInstanceTypes(Strict):
    web: InstanceType = DEFAULT_INSTANCE_TYPES["web"]
    worker: InstanceType = DEFAULT_INSTANCE_TYPES["worker"]
    cache: InstanceType = DEFAULT_INSTANCE_TYPES["cache"]
    db_primary: InstanceType = Field(default=DEFAULT_INSTANCE_TYPES["db-primary"], alias="db-primary")
    db_replica: InstanceType = Field(default=DEFAULT_INSTANCE_TYPES["db-replica"], alias="db-replica")

    def by_role(self) -> dict[str, str]:
        return {"web": self.web, "worker": self.worker, "cache": self.cache, "db-primary": self.db_primary,
                "db-replica": self.db_replica}

    @model_validator(mode="after")
    def _one_architecture(self):
        # one AMI serves every role (and releases are built for one architecture)
        kinds = {role: arm64(kind) for role, kind in self.by_role().items()}
        if len(set(kinds.values())) > 1:
            arm = sorted(role for role, is_arm in kinds.items() if is_arm)
            raise ValueError(f"{', '.join(arm)}: Graviton (arm64) instance types beside x86_64 ones: every role "
                             "runs one AMI, so give all roles types of one architecture")
        return self

    def architecture(self) -> str:
        return "arm64" if arm64(self.web) else "amd64"


class AwsConfig(Strict):
    """`provider: aws`: where on AWS the environment is made."""

    region: Region
    vpc: AwsVpc
    ami: AmiId | None = Field(default=None, description=(
        "the image of every instance; default: the current Debian 12 image, from its public SSM parameter"))
    instance_types: AwsInstanceTypes = AwsInstanceTypes()
    certificate_arn: CertificateArn | None = Field(default=None, description=(
        "the load balancer's certificate in ACM; default: lb.certificate and lb.key (or a self-signed one), "
        "imported into ACM"))
    state_bucket: BucketName = Field(description="the S3 bucket of the environment's state, lock and history")

    @model_validator(mode="after")
    def _certificate_in_region(self):
        if self.certificate_arn is not None and self.certificate_arn.split(":")[3] != self.region:
            raise ValueError(f"certificate_arn is in region {self.certificate_arn.split(':')[3]}, but a load "
                             f"balancer in {self.region} needs a certificate of its own region")
        return self


# each provider's own section, by the name `provider:` gives (one section per provider)
PROVIDER_SECTIONS = ("local", "ssh", "aws")

