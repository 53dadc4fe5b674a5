"""The instances of the fixed roles (worker, cache, db-primary, db-replica): one EC2 instance per
inventory record, found by its tags (`fabula:server=<name>` beside the environment's), never by a
ClientToken (moto does not make it idempotent) nor by a state file. Each runs the roles' image
with an encrypted gp3 root volume, IMDSv2 only, in its role's security groups and the common one,
with the environment's EC2 key pair; the database primary and its replicas in different zones.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from fabula.providers.aws.cloud import AwsError, Cloud, aws_errors, described, error_code
from fabula.providers.aws.group import ROOT_VOLUME_GIB
from fabula.providers.aws.network import Network

SERVER_TAG = "fabula:server"
ROLE_TAG = "fabula:role"
KEY_TAG = "fabula:key-sha256"
RELEASE_TAG = "fabula:release"
FIXED_ROLES = ("worker", "cache", "db-primary", "db-replica")
DB_ROLES = ("db-primary", "db-replica")
LIVE_STATES = ["pending", "running", "stopping", "stopped"]
PROFILE_WAIT = 60.0   # seconds a new instance profile may take to reach EC2


@dataclass(frozen=True)
class Instance:
    id: str
    name: str            # the inventory's record (fabula:server), or the id for a web group's instance
    role: str
    state: str
    private_ip: str
    public_ip: str | None
    subnet_id: str
    zone: str
    security_groups: tuple[str, ...]
    release: str | None = None   # a web group's instance: the release of the template it was launched from

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Instance:
        tags = {t["Key"]: t["Value"] for t in raw.get("Tags") or []}
        return cls(id=raw["InstanceId"], name=tags.get(SERVER_TAG, raw["InstanceId"]), role=tags.get(ROLE_TAG, ""),
                   state=raw["State"]["Name"], private_ip=raw.get("PrivateIpAddress", ""),
                   public_ip=raw.get("PublicIpAddress") or None, subnet_id=raw.get("SubnetId", ""),
                   zone=raw.get("Placement", {}).get("AvailabilityZone", ""),
                   security_groups=tuple(sorted(g["GroupId"] for g in raw.get("SecurityGroups") or [])),
                   release=tags.get(RELEASE_TAG))


def ssh_address(instance: Instance, jump: str | None) -> str:
    """Where fabula reaches an instance over SSH: its private address through a jump host (a
    bastion in the VPC), else its public one (none: the private one, e.g. from inside the VPC)."""
    if jump or instance.public_ip is None:
        return instance.private_ip
    return instance.public_ip


@aws_errors
def find(cloud: Cloud, name: str | None = None, *, ids: Sequence[str] = ()) -> list[Instance]:
    """The environment's live instances (of the record `name`, or with these ids), by tags."""
    extra = {SERVER_TAG: name} if name is not None else {}
    filters = [*cloud.filters(**extra), {"Name": "instance-state-name", "Values": LIVE_STATES}]
    kwargs: dict[str, Any] = {"Filters": filters, **({"InstanceIds": list(ids)} if ids else {})}
    return [Instance.of(i) for page in cloud.ec2.get_paginator("describe_instances").paginate(**kwargs)
            for reservation in page["Reservations"] for i in reservation["Instances"]]


@aws_errors
def find_member(cloud: Cloud, instance_id: str) -> Instance | None:
    """The web group's live instance `instance_id` (its name in fabula), or None: by a filter,
    not InstanceIds, which fails for an id that is gone."""
    filters = [*cloud.filters(**{ROLE_TAG: "web"}), {"Name": "instance-id", "Values": [instance_id]},
               {"Name": "instance-state-name", "Values": LIVE_STATES}]
    found = [Instance.of(i) for r in cloud.ec2.describe_instances(Filters=filters)["Reservations"]
             for i in r["Instances"]]
    return found[0] if found else None


def choose_subnet(role: str, network: Network, others: Sequence[Instance]) -> str:
    """A database server goes to a zone where no server of the other database role is (a zone's
    loss never takes the primary with its replica); the others to the first subnet."""
    if role in DB_ROLES:
        opposite = set(DB_ROLES) - {role}
        taken = {i.zone for i in others if i.role in opposite}
        for subnet, zone in zip(network.subnet_ids, network.zones, strict=True):
            if zone not in taken:
                return subnet
        # every zone holds one already (more replicas than zones): spread from the second on
        return network.subnet_ids[min(1, len(network.subnet_ids) - 1)]
    return network.subnet_ids[0]


@aws_errors
def ensure_key_pair(cloud: Cloud, public_key: str) -> str:
    """The environment's EC2 key pair, imported from `public_key` (an OpenSSH public key line);
    imported again when the key changed (AWS cannot replace a key pair's material in place)."""
    name = cloud.name("key")
    digest = hashlib.sha256(public_key.strip().encode()).hexdigest()
    found = described(cloud.ec2.describe_key_pairs, "KeyPairs", "InvalidKeyPair.NotFound", KeyNames=[name])
    if found:
        tags = {t["Key"]: t["Value"] for t in found[0].get("Tags") or []}
        if not cloud.owns(found[0].get("Tags")):
            raise AwsError(f"EC2 key pair {name} exists but is not environment {cloud.tag_value}'s",
                           "delete or rename it in the AWS console")
        if tags.get(KEY_TAG) == digest:
            return name
        cloud.ec2.delete_key_pair(KeyName=name)
    cloud.ec2.import_key_pair(KeyName=name, PublicKeyMaterial=public_key.strip().encode(),
                              TagSpecifications=cloud.tag_spec("key-pair", name, **{KEY_TAG: digest}))
    return name


@aws_errors
def launch(cloud: Cloud, *, name: str, role: str, image: str, instance_type: str, subnet_id: str,
           security_group_ids: Sequence[str], key_name: str, instance_profile: str | None = None) -> Instance:
    """`instance_profile`: the instance's role (the worker's: controller_role.py)."""
    ec2 = cloud.ec2
    images = ec2.describe_images(ImageIds=[image])["Images"]
    if not images:
        raise AwsError(f"image {image} does not exist in {cloud.region}",
                       "give `aws.ami` an image of this region (or leave it out for Debian 12's current one)")
    tags = {SERVER_TAG: name, ROLE_TAG: role}
    profile = {"IamInstanceProfile": {"Name": instance_profile}} if instance_profile else {}
    made = run_instances(
        cloud, **profile, ImageId=image, InstanceType=instance_type, MinCount=1, MaxCount=1, KeyName=key_name,
        SubnetId=subnet_id, SecurityGroupIds=list(security_group_ids),
        BlockDeviceMappings=[{"DeviceName": images[0].get("RootDeviceName", "/dev/xvda"), "Ebs": {
            "Encrypted": True, "VolumeType": "gp3", "VolumeSize": ROOT_VOLUME_GIB, "DeleteOnTermination": True}}],
        # IMDSv2 only: a request forged through the app cannot read the instance's credentials
        MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1},
        TagSpecifications=[{"ResourceType": kind, "Tags": cloud.tags(cloud.name(name), **tags)}
                           for kind in ("instance", "volume")])
    return Instance.of(made["Instances"][0])


def run_instances(cloud: Cloud, **request: Any) -> dict[str, Any]:
    """RunInstances, again while a new instance profile is not yet known to EC2 (IAM's changes
    take seconds to reach it)."""
    waited = 0.0
    while True:
        try:
            return dict(cloud.ec2.run_instances(**request))
        except ClientError as exc:
            if "IamInstanceProfile" not in request or error_code(exc) != "InvalidParameterValue" or \
                    "iamInstanceProfile" not in str(exc) or waited >= PROFILE_WAIT:
                raise
        cloud.sleep(5)
        waited += 5


@aws_errors
def wait_running(cloud: Cloud, instance_id: str) -> Instance:
    cloud.ec2.get_waiter("instance_running").wait(InstanceIds=[instance_id], WaiterConfig={
        "Delay": 5, "MaxAttempts": int(cloud.wait_timeout // 5)})
    found = find(cloud, ids=[instance_id])
    if not found:
        raise AwsError(f"instance {instance_id} ended as it started", "read its console output in the AWS console")
    return found[0]


@aws_errors
def set_role(cloud: Cloud, instance: Instance, role: str) -> None:
    """A failover changes a database server's role: its tag follows (its groups: apply_firewall)."""
    if instance.role != role:
        cloud.ec2.create_tags(Resources=[instance.id], Tags=[{"Key": ROLE_TAG, "Value": role}])


@aws_errors
def set_groups(cloud: Cloud, instance: Instance, group_ids: Sequence[str]) -> bool:
    if set(instance.security_groups) == set(group_ids):
        return False
    cloud.ec2.modify_instance_attribute(InstanceId=instance.id, Groups=list(group_ids))
    return True


@aws_errors
def terminate(cloud: Cloud, instance_ids: Sequence[str]) -> None:
    if not instance_ids:
        return
    cloud.ec2.terminate_instances(InstanceIds=list(instance_ids))
    cloud.ec2.get_waiter("instance_terminated").wait(InstanceIds=list(instance_ids), WaiterConfig={
        "Delay": 5, "MaxAttempts": int(cloud.wait_timeout // 5)})
