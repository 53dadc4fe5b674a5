"""`provider: aws` in fabula.yml: the `aws:` section (region, VPC, AMI, instance types,
certificate, state bucket), with `ssh:`, `admin_sources`, `servers:` and `autoscaling:`; each
mistake refused with one message naming the key and a fix."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from fabula.config import load_config
from fabula.config.providers import arm64, aws_capacity, aws_subnets
from tests.unit.test_config import error_for, write

ARN = "arn:aws:acm:eu-west-1:123456789012:certificate/0a1b2c3d-4e5f-6789-abcd-ef0123456789"
AWS = f"""\
project: shop
app:
  wsgi: shop.wsgi:application
  settings: shop.settings
environments:
  production:
    provider: aws
    aws:
      region: eu-west-1
      vpc: {{cidr: 10.40.0.0/16}}
      ami: ami-0a1b2c3d4e5f67890
      instance_types: {{web: t3.small, worker: t3.small, cache: t3.small, db-primary: m6i.large, db-replica: m6i.large}}
      certificate_arn: {ARN}
      state_bucket: example-fabula-state
    ssh: {{user: admin, jump: bastion.example.com}}
    admin_sources: [198.51.100.0/24]
    servers: {{web: 2, worker: 1, cache: 1, db-primary: 1, db-replica: 1}}
    autoscaling: {{min: 2, desired: 2, max: 8, metric: requests, target: 100}}
"""
MINIMAL = """\
project: shop
app:
  wsgi: shop.wsgi:application
  settings: shop.settings
environments:
  staging:
    provider: aws
    aws: {region: eu-west-1, vpc: {cidr: 10.40.0.0/24}, state_bucket: shop-state}
    admin_sources: [198.51.100.7/32]
"""


def test_the_issues_example_is_valid(tmp_path: Path):
    env = load_config(write(tmp_path, AWS)).environment("production")
    assert env.provider == "aws" and not env.fixed_inventory and env.aws is not None
    assert (env.aws.region, env.aws.vpc.cidr, env.aws.ami) == (
        "eu-west-1", ipaddress.IPv4Network("10.40.0.0/16"), "ami-0a1b2c3d4e5f67890")
    assert env.aws.instance_types.by_role()["db-primary"] == "m6i.large"
    assert env.aws.certificate_arn == ARN and env.aws.state_bucket == "example-fabula-state"
    assert env.ssh is not None and (env.ssh.user, env.ssh.jump) == ("admin", "bastion.example.com")
    group = env.web_group()
    assert (group.min, group.desired, group.max, group.metric, group.target) == (2, 2, 8, "requests", 100)
    # the load balancer listens on the usual ports unless told otherwise
    assert (env.lb.https_port, env.lb.http_port) == (443, 80)


def test_the_defaults(tmp_path: Path):
    env = load_config(write(tmp_path, MINIMAL)).environment("staging")
    assert env.aws is not None and env.aws.ami is None and env.aws.certificate_arn is None
    assert env.aws.instance_types.by_role() == {"web": "t3.small", "worker": "t3.small", "cache": "t3.small",
                                                "db-primary": "m6i.large", "db-replica": "m6i.large"}
    assert env.aws.instance_types.architecture() == "amd64"
    assert env.ssh is not None and env.ssh.user == "admin"  # the Debian images' user
    # without `metric`, an Auto Scaling group tracks requests
    text = MINIMAL.replace("    admin_sources:", "    autoscaling: {min: 1, max: 3}\n    admin_sources:")
    group = load_config(write(tmp_path, text)).environment("staging").web_group()
    assert group.metric == "requests" and group.max == 3


def test_an_adopted_vpc_and_explicit_ports(tmp_path: Path):
    text = MINIMAL.replace("vpc: {cidr: 10.40.0.0/24}",
                           "vpc: {id: vpc-0a1b2c3d, subnets: [subnet-0a1b2c3d, subnet-1a2b3c4d5e6f70819]}")
    text = text.replace("    admin_sources:", "    lb: {https_port: 8443, http_port: 8080}\n    admin_sources:")
    env = load_config(write(tmp_path, text)).environment("staging")
    assert env.aws is not None and env.aws.vpc.id == "vpc-0a1b2c3d" and env.aws.vpc.cidr is None
    assert env.aws.vpc.subnets == ["subnet-0a1b2c3d", "subnet-1a2b3c4d5e6f70819"]
    assert (env.lb.https_port, env.lb.http_port) == (8443, 8080)


def test_graviton_types_make_an_arm64_environment(tmp_path: Path):
    text = MINIMAL.replace("state_bucket: shop-state}", "state_bucket: shop-state, instance_types: {web: t4g.small, "
                           "worker: t4g.small, cache: t4g.micro, db-primary: m7gd.large, db-replica: r6g.large}}")
    env = load_config(write(tmp_path, text)).environment("staging")
    assert env.aws is not None and env.aws.instance_types.architecture() == "arm64"
    assert [arm64(t) for t in ("t3.small", "g5.xlarge", "c6gn.large", "a1.medium", "m5zn.large", "mac2-m2.metal")] == [
        False, False, True, True, False, False]


def test_a_vpc_is_split_into_two_subnets():
    assert [str(n) for n in aws_subnets(ipaddress.IPv4Network("10.40.0.0/16"))] == ["10.40.0.0/20", "10.40.16.0/20"]
    assert [str(n) for n in aws_subnets(ipaddress.IPv4Network("10.40.0.0/24"))] == ["10.40.0.0/25", "10.40.0.128/25"]
    assert aws_capacity(ipaddress.IPv4Network("10.40.0.0/27")) == 22


@pytest.mark.parametrize(("change", "expected"), [
    (("region: eu-west-1", "region: Europe"), "aws.region"),
    (("region: eu-west-1", "region: 'eu-west-1\\n'"), "aws.region"),
    (("cidr: 10.40.0.0/24", "cidr: 8.8.8.0/24"), "not a private network"),
    (("cidr: 10.40.0.0/24", "cidr: 10.0.0.0/8"), "prefix length"),
    (("cidr: 10.40.0.0/24", "cidr: 10.40.0.0/28"), "prefix length"),
    (("cidr: 10.40.0.0/24", "cidr: 10.40.0.7/24"), "aws.vpc.cidr"),
    (("vpc: {cidr: 10.40.0.0/24}", "vpc: {id: vpc-0a1b2c3d}"), "needs `subnets`"),
    (("vpc: {cidr: 10.40.0.0/24}", "vpc: {id: vpc-XYZ, subnets: [subnet-0a1b2c3d, subnet-1a1b2c3d]}"), "a VPC id"),
    (("vpc: {cidr: 10.40.0.0/24}", "vpc: {id: vpc-0a1b2c3d, subnets: [subnet-0a1b2c3d]}"), "aws.vpc.subnets"),
    (("vpc: {cidr: 10.40.0.0/24}", "vpc: {id: vpc-0a1b2c3d, subnets: [subnet-0a1b2c3d, subnet-0a1b2c3d]}"),
     "each subnet once"),
    (("vpc: {cidr: 10.40.0.0/24}", "vpc: {id: vpc-0a1b2c3d, subnets: [subnet-0a1b2c3d, sg-0a1b2c3d]}"),
     "aws.vpc.subnets[1]"),
    (("vpc: {cidr: 10.40.0.0/24}", "vpc: {cidr: 10.40.0.0/24, id: vpc-0a1b2c3d, subnets: [subnet-0a1b2c3d, "
      "subnet-1a1b2c3d]}"), "not both"),
    (("vpc: {cidr: 10.40.0.0/24}", "vpc: {}"), "give `cidr`"),
    (("state_bucket: shop-state", "state_bucket: Shop_State"), "an S3 bucket name"),
    (("state_bucket: shop-state", "state_bucket: shop.state"), "no dots"),
    (("state_bucket: shop-state", "state_bucket: xn--shop"), "no prefix xn--"),
    (("state_bucket: shop-state", "state_bucket: ab"), "3 to 63"),
    (("state_bucket: shop-state", "state_bucket: shop-state-s3alias"), "no suffix"),
    ((", state_bucket: shop-state", ""), "aws.state_bucket"),
    (("state_bucket: shop-state}", "state_bucket: shop-state, ami: ami-xyz}"), "an AMI id"),
    (("state_bucket: shop-state}", "state_bucket: shop-state, ami: 'ami-0a1b2c3d\\n'}"), "aws.ami"),
    (("state_bucket: shop-state}", "state_bucket: shop-state, instance_types: {web: huge}}"),
     "aws.instance_types.web"),
    (("state_bucket: shop-state}", "state_bucket: shop-state, instance_types: {lb: t3.small}}"), "unknown key 'lb'"),
    (("state_bucket: shop-state}", "state_bucket: shop-state, instance_types: {web: t4g.small}}"),
     "one architecture"),
    (("state_bucket: shop-state}", "state_bucket: shop-state, certificate_arn: 'arn:aws:iam::1:x'}"),
     "aws.certificate_arn"),
    (("state_bucket: shop-state}",
      f"state_bucket: shop-state, certificate_arn: {ARN.replace('eu-west-1', 'us-east-1')}}}"),
     "certificate of its own region"),
    (("state_bucket: shop-state}", "state_bucket: shop-state, zone: a}"), "unknown key 'zone'"),
    (("    admin_sources: [198.51.100.7/32]\n", ""), "needs `admin_sources`"),
    (("    admin_sources: [198.51.100.7/32]", "    admin_sources: []"), "needs `admin_sources`"),
    (("198.51.100.7/32", "198.51.100.7/33"), "admin_sources"),
    (("    aws: {region", "    local: {bind: 127.0.0.1}\n    aws: {region"), "keys of `provider: local`"),
    (("    aws: {region: eu-west-1, vpc: {cidr: 10.40.0.0/24}, state_bucket: shop-state}\n", ""),
     "needs its `aws:` section"),
    (("    provider: aws\n", "    provider: aws\n    hosts: {web1: {role: web, address: 10.0.0.1}}\n"),
     "`hosts` is a key of `provider: ssh`"),
    (("    provider: aws\n", "    provider: aws\n    users: [{name: alice, keys: []}]\n"),
     "`users` is a key of `provider: ssh`"),
    (("    provider: aws\n", "    provider: aws\n    autoscaling: {metric: sessions}\n"), "use `metric: requests`"),
    (("    provider: aws\n", "    provider: local\n"),
     "`admin_sources` is a key of `provider: ssh` and `provider: aws`"),
    (("cidr: 10.40.0.0/24}, state_bucket: shop-state}\n",
      "cidr: 10.40.0.0/27}, state_bucket: shop-state}\n    autoscaling: {min: 1, max: 20}\n"), "use a larger VPC"),
])
def test_mistakes_are_refused_naming_the_key(tmp_path: Path, change: tuple[str, str], expected: str):
    old, new = change
    assert old in MINIMAL
    message = error_for(tmp_path, MINIMAL.replace(old, new))
    assert expected in message and "fix:" in message, message
    assert "Traceback" not in message


def test_the_aws_section_belongs_to_provider_aws(tmp_path: Path):
    text = MINIMAL.replace("    provider: aws\n", "    provider: local\n").replace(
        "    admin_sources: [198.51.100.7/32]\n", "")
    message = error_for(tmp_path, text)
    assert "`aws` is the section of `provider: aws`" in message and "fix:" in message
