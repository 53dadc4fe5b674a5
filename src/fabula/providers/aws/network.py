"""The environment's network on AWS: a VPC with two subnets in two availability zones, its
internet gateway and default route (or an existing VPC and its subnets, adopted and never
removed), and the security groups named as the seed names them, whose rules reference each
other rather than addresses.

Each step looks its resources up by the environment's tags first and makes only what is missing,
so a second run makes no change and a run after a crash finishes the job.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fabula.config.providers import AwsVpc, aws_subnets
from fabula.providers.aws.cloud import AwsError, Cloud, aws_errors
from fabula.providers.base import IngressRule

SSH_PORT = 22
ANYWHERE = ("0.0.0.0/0",)   # the ALB is IPv4 only (IpAddressType ipv4)
# each role's security group besides the common one; the database roles share one group (so
# "5432 from the db group" is how the replica reaches the primary, as in the seed)
ROLE_GROUP = {"web": "web", "worker": "worker", "cache": "cache", "db-primary": "db", "db-replica": "db"}
# every group fabula makes: the seed's, plus the load balancer's and one for a fenced server
GROUP_KINDS = ("common", "web", "worker", "cache", "db", "lb", "fenced")
DESCRIPTIONS = {
    "common": "fabula: every server; SSH from the admins",
    "web": "fabula: web servers",
    "worker": "fabula: the worker",
    "cache": "fabula: Redis and RabbitMQ",
    "db": "fabula: PostgreSQL primary and replicas",
    "lb": "fabula: the load balancer",
    "fenced": "fabula: a fenced server; nothing but SSH",
}


@dataclass(frozen=True)
class Network:
    vpc_id: str
    subnet_ids: tuple[str, ...]
    zones: tuple[str, ...]
    made: bool   # fabula made the VPC: destroy removes it (an adopted one is left alone)
    cidr: str    # the VPC's range: where every instance's address is (pg_hba, the group's instances)


@dataclass(frozen=True)
class Permission:
    """One ingress rule of a group: TCP `port` on the group `kind`, from the group `source` or
    from the network `cidr`."""

    kind: str
    port: int
    description: str
    source: str | None = None
    cidr: str | None = None


def group_name(cloud: Cloud, kind: str) -> str:
    """The seed's names: `<project>-<env>-sg` for the common group, `<project>-<env>-web-sg`..."""
    return cloud.name("sg") if kind == "common" else cloud.name(f"{kind}-sg")


def server_groups(role: str) -> tuple[str, ...]:
    """The groups of a server of `role`: the common one and its role's."""
    return ("common", ROLE_GROUP[role])


# -- the VPC --------------------------------------------------------------------------------------

@aws_errors
def ensure_network(cloud: Cloud, vpc: AwsVpc) -> Network:
    if vpc.id is not None:
        assert vpc.subnets is not None  # the config requires them together
        return _adopt(cloud, vpc.id, vpc.subnets)
    assert vpc.cidr is not None
    return _ensure_vpc(cloud, vpc.cidr)


def _adopt(cloud: Cloud, vpc_id: str, subnet_ids: Sequence[str]) -> Network:
    found = {s["SubnetId"]: s for s in cloud.ec2.describe_subnets(SubnetIds=list(subnet_ids))["Subnets"]}
    elsewhere = [s for s in subnet_ids if found[s]["VpcId"] != vpc_id]
    if elsewhere:
        raise AwsError(f"aws.vpc.subnets: {', '.join(elsewhere)} not in {vpc_id}",
                       f"list subnets of {vpc_id} (aws ec2 describe-subnets --filters Name=vpc-id,Values={vpc_id})")
    zones = tuple(found[s]["AvailabilityZone"] for s in subnet_ids)
    if len(set(zones)) < 2:
        raise AwsError(f"aws.vpc.subnets: all in availability zone {zones[0]}; a load balancer needs two zones",
                       "list subnets of at least two availability zones")
    cidr = cloud.ec2.describe_vpcs(VpcIds=[vpc_id])["Vpcs"][0]["CidrBlock"]
    return Network(vpc_id, tuple(subnet_ids), zones, made=False, cidr=cidr)


def _ensure_vpc(cloud: Cloud, cidr: ipaddress.IPv4Network) -> Network:
    ec2 = cloud.ec2
    vpcs = ec2.describe_vpcs(Filters=cloud.filters())["Vpcs"]
    if len(vpcs) > 1:
        raise AwsError(f"{len(vpcs)} VPCs are tagged as environment {cloud.tag_value}: "
                       f"{', '.join(v['VpcId'] for v in vpcs)}",
                       "remove the one fabula does not use (`fabula destroy` removes them all)")
    if vpcs:
        vpc_id = vpcs[0]["VpcId"]
        if vpcs[0]["CidrBlock"] != str(cidr):
            raise AwsError(f"aws.vpc.cidr: the environment's VPC {vpc_id} is {vpcs[0]['CidrBlock']}, not {cidr}",
                           f"put back cidr: {vpcs[0]['CidrBlock']} (a VPC's range cannot change), or destroy the "
                           "environment first")
    else:
        vpc_id = ec2.create_vpc(CidrBlock=str(cidr),
                                TagSpecifications=cloud.tag_spec("vpc", cloud.name("vpc")))["Vpc"]["VpcId"]
    subnet_ids, zones = _ensure_subnets(cloud, vpc_id, aws_subnets(cidr))
    _ensure_route_out(cloud, vpc_id)
    return Network(vpc_id, subnet_ids, zones, made=True, cidr=str(cidr))


def _ensure_subnets(cloud: Cloud, vpc_id: str, wanted: Iterable[ipaddress.IPv4Network]
                    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    ec2 = cloud.ec2
    have = {s["CidrBlock"]: s for s in ec2.describe_subnets(
        Filters=[{"Name": "vpc-id", "Values": [vpc_id]}, *cloud.filters()])["Subnets"]}
    wanted = list(wanted)
    free_zones: list[str] = []
    if any(str(net) not in have for net in wanted):
        zones = ec2.describe_availability_zones(Filters=[{"Name": "state", "Values": ["available"]},
                                                         {"Name": "zone-type", "Values": ["availability-zone"]}])
        used = {s["AvailabilityZone"] for s in have.values()}
        free_zones = sorted(z["ZoneName"] for z in zones["AvailabilityZones"] if z["ZoneName"] not in used)
    ids, zones_used = [], []
    for index, net in enumerate(wanted):
        subnet = have.get(str(net))
        if subnet is None:
            if not free_zones:
                raise AwsError(f"region {cloud.region} has no second availability zone for {net}",
                               "choose a region with two availability zones or more")
            subnet = ec2.create_subnet(VpcId=vpc_id, CidrBlock=str(net), AvailabilityZone=free_zones.pop(0),
                                       TagSpecifications=cloud.tag_spec("subnet", cloud.name(f"subnet-{index}")))[
                "Subnet"]
        if not subnet.get("MapPublicIpOnLaunch"):
            # instances need an address of the internet's: apt, and fabula's SSH without a bastion
            ec2.modify_subnet_attribute(SubnetId=subnet["SubnetId"], MapPublicIpOnLaunch={"Value": True})
        ids.append(subnet["SubnetId"])
        zones_used.append(subnet["AvailabilityZone"])
    return tuple(ids), tuple(zones_used)


def _ensure_route_out(cloud: Cloud, vpc_id: str) -> None:
    """An internet gateway attached to the VPC, and the main route table's default route to it
    (the main table is the VPC's own: it goes with the VPC, nothing of fabula's to remove)."""
    ec2 = cloud.ec2
    gateways = ec2.describe_internet_gateways(Filters=cloud.filters())["InternetGateways"]
    if gateways:
        gateway = gateways[0]
    else:
        gateway = ec2.create_internet_gateway(
            TagSpecifications=cloud.tag_spec("internet-gateway", cloud.name("igw")))["InternetGateway"]
    gateway_id = gateway["InternetGatewayId"]
    if not any(a.get("VpcId") == vpc_id for a in gateway.get("Attachments", [])):
        # (a crash between the create and the attach leaves a detached gateway: attached now)
        ec2.attach_internet_gateway(InternetGatewayId=gateway_id, VpcId=vpc_id)
    tables = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc_id]},
                                                {"Name": "association.main", "Values": ["true"]}])["RouteTables"]
    table = tables[0]
    default = [r for r in table.get("Routes", []) if r.get("DestinationCidrBlock") == "0.0.0.0/0"]
    if not default:
        ec2.create_route(RouteTableId=table["RouteTableId"], DestinationCidrBlock="0.0.0.0/0", GatewayId=gateway_id)
    elif default[0].get("GatewayId") != gateway_id:
        ec2.replace_route(RouteTableId=table["RouteTableId"], DestinationCidrBlock="0.0.0.0/0", GatewayId=gateway_id)


# -- security groups ------------------------------------------------------------------------------

def planned_permissions(role_rules: Mapping[str, Sequence[IngressRule]], admin_sources: Sequence[Any],
                        lb_ports: Sequence[int]) -> list[Permission]:
    """The rules of every group: the roles' own (`Role.ingress`, passed in: roles are above the
    providers), resolved to group references; SSH from the admins on the common and the fenced
    groups; the load balancer's ports from anywhere."""
    planned: dict[tuple[str, int, str | None, str | None], Permission] = {}

    def add(permission: Permission) -> None:
        planned.setdefault((permission.kind, permission.port, permission.source, permission.cidr), permission)

    for role, rules in role_rules.items():
        kind = ROLE_GROUP[role]
        for rule in rules:
            for source_role in rule.from_roles:
                add(Permission(kind, rule.port, rule.description, source=ROLE_GROUP[source_role]))
            if rule.from_load_balancer:
                add(Permission(kind, rule.port, rule.description, source="lb"))
            for cidr in ANYWHERE if rule.from_anywhere else ():
                add(Permission(kind, rule.port, rule.description, cidr=cidr))
    for network in admin_sources:
        for kind in ("common", "fenced"):
            add(Permission(kind, SSH_PORT, "ssh from the admins", cidr=str(network)))
    # a fenced former primary that `reset-replicas` rebuilds takes its base backup from the
    # primary while still fenced (it admits nothing but SSH; it may reach the primary, as on the
    # other providers): the primary's group admits it where it admits the replicas
    for rule in role_rules.get("db-primary", ()):
        if "db-replica" in rule.from_roles:
            add(Permission(ROLE_GROUP["db-primary"], rule.port, "a fenced former primary's base backup",
                           source="fenced"))
    # fabula's controller on the worker converges the web servers the group launches, over SSH
    add(Permission("common", SSH_PORT, "ssh from fabula's controller on the worker", source="worker"))
    for port in lb_ports:
        for cidr in ANYWHERE:
            add(Permission("lb", port, "the site, from anywhere", cidr=cidr))
    return list(planned.values())


def _rule_key(rule: dict[str, Any]) -> tuple[int, str, str]:
    """A rule as AWS describes it: (port, source kind, source)."""
    if rule.get("ReferencedGroupInfo"):
        return rule.get("FromPort", -1), "group", rule["ReferencedGroupInfo"]["GroupId"]
    if rule.get("CidrIpv6"):
        return rule.get("FromPort", -1), "cidr", rule["CidrIpv6"]
    return rule.get("FromPort", -1), "cidr", rule.get("CidrIpv4", "")


def _ip_permission(permission: Permission, ids: Mapping[str, str]) -> dict[str, Any]:
    wanted: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": permission.port, "ToPort": permission.port}
    if permission.source is not None:
        wanted["UserIdGroupPairs"] = [{"GroupId": ids[permission.source], "Description": permission.description}]
    elif permission.cidr is not None and ipaddress.ip_network(permission.cidr).version == 6:
        wanted["Ipv6Ranges"] = [{"CidrIpv6": permission.cidr, "Description": permission.description}]
    else:
        wanted["IpRanges"] = [{"CidrIp": permission.cidr, "Description": permission.description}]
    return wanted


@aws_errors
def ensure_security_groups(cloud: Cloud, network: Network, permissions: Sequence[Permission]) -> dict[str, str]:
    """Every group of GROUP_KINDS, with exactly `permissions` as its ingress rules (a rule no
    longer planned, e.g. an admin network taken out of fabula.yml, is revoked). Egress stays
    AWS's default (everything): apt, DNS and the app's own calls are not limited. Returns each
    kind's group id."""
    ec2 = cloud.ec2
    have = {g["GroupName"]: g["GroupId"] for g in ec2.describe_security_groups(
        Filters=[{"Name": "vpc-id", "Values": [network.vpc_id]}, *cloud.filters()])["SecurityGroups"]}
    ids: dict[str, str] = {}
    for kind in GROUP_KINDS:
        name = group_name(cloud, kind)
        if name not in have:
            have[name] = ec2.create_security_group(
                GroupName=name, Description=DESCRIPTIONS[kind], VpcId=network.vpc_id,
                TagSpecifications=cloud.tag_spec("security-group", name, **{"fabula:group": kind}))["GroupId"]
        ids[kind] = have[name]
    existing = ec2.describe_security_group_rules(
        Filters=[{"Name": "group-id", "Values": list(ids.values())}])["SecurityGroupRules"]
    by_group: dict[str, dict[tuple[int, str, str], str]] = {gid: {} for gid in ids.values()}
    for rule in existing:
        if not rule.get("IsEgress") and rule.get("IpProtocol") == "tcp" and rule["GroupId"] in by_group:
            by_group[rule["GroupId"]][_rule_key(rule)] = rule["SecurityGroupRuleId"]
    for kind in GROUP_KINDS:
        group_id = ids[kind]
        mine = [p for p in permissions if p.kind == kind]
        wanted = {(p.port, "group" if p.source else "cidr", ids[p.source] if p.source else str(p.cidr)): p
                  for p in mine}
        missing = [p for key, p in wanted.items() if key not in by_group[group_id]]
        extra = [rule_id for key, rule_id in by_group[group_id].items() if key not in wanted]
        if missing:
            ec2.authorize_security_group_ingress(
                GroupId=group_id, IpPermissions=[_ip_permission(p, ids) for p in missing],
                TagSpecifications=cloud.tag_spec("security-group-rule"))
        if extra:
            ec2.revoke_security_group_ingress(GroupId=group_id, SecurityGroupRuleIds=extra)
    return ids


@aws_errors
def fence(cloud: Cloud, instance_id: str, groups: Mapping[str, str]) -> None:
    """Swap a server's groups for the fenced one, which admits nothing but SSH: a failed
    primary takes no more connections, and can still be looked at."""
    cloud.ec2.modify_instance_attribute(InstanceId=instance_id, Groups=[groups["fenced"]])
