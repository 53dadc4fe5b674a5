"""The worker's instance role: fabula's program there (program_home: the web group's keeper)
calls AWS with its credentials, which the instance's metadata service gives it; the role may
make exactly the calls the program's rounds make (policy.CONTROLLER_CALLS), and reach the state
bucket's objects of this environment only. Named `<project>-<env>-controller`, role and
instance profile alike; removed by destroy (teardown.destroy)."""
from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import ClientError

from fabula.providers.aws.cloud import Cloud, aws_errors, is_not_found
from fabula.providers.aws.policy import CONTROLLER_CALLS, CONTROLLER_ON_CHANGE, iam_actions

POLICY = "fabula-controller"
TRUST = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


def name(cloud: Cloud) -> str:
    return cloud.name("controller")


def policy(cloud: Cloud, bucket: str) -> dict[str, Any]:
    actions = iam_actions((*CONTROLLER_CALLS, *CONTROLLER_ON_CHANGE), with_implied=False)
    s3 = [a for a in actions if a.startswith("s3:")]
    prefix = f"{cloud.project}/{cloud.env}/"
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "Keeper", "Effect": "Allow", "Action": [a for a in actions if not a.startswith("s3:")],
         "Resource": "*"},
        {"Sid": "SharedState", "Effect": "Allow", "Action": s3,
         "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/{prefix}*"]}]}


def _found(call: Any, **kwargs: Any) -> dict[str, Any] | None:
    try:
        return dict(call(**kwargs))
    except ClientError as exc:
        if is_not_found(exc):
            return None
        raise


@aws_errors
def ensure_instance_profile(cloud: Cloud, bucket: str) -> str:
    """The role, its policy and its instance profile, made or corrected; the profile's name."""
    iam, role = cloud.iam, name(cloud)
    if _found(iam.get_role, RoleName=role) is None:
        iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(TRUST),
                        Description=f"fabula's program on the worker of {cloud.tag_value}",
                        Tags=cloud.tags(role))
    wanted = policy(cloud, bucket)
    current = _found(iam.get_role_policy, RoleName=role, PolicyName=POLICY)
    document = current.get("PolicyDocument") if current else None
    if isinstance(document, str):
        document = json.loads(document)
    if document != wanted:
        iam.put_role_policy(RoleName=role, PolicyName=POLICY, PolicyDocument=json.dumps(wanted))
    profile = _found(iam.get_instance_profile, InstanceProfileName=role)
    if profile is None:
        iam.create_instance_profile(InstanceProfileName=role, Tags=cloud.tags(role))
        roles: list[str] = []
    else:
        roles = [r["RoleName"] for r in profile["InstanceProfile"].get("Roles", [])]
    if role not in roles:
        iam.add_role_to_instance_profile(InstanceProfileName=role, RoleName=role)
    return role


@aws_errors
def attach(cloud: Cloud, instance_id: str, profile: str) -> bool:
    """The worker given the profile, if it has none (one made before fabula gave it a role)."""
    associations = cloud.ec2.describe_iam_instance_profile_associations(Filters=[
        {"Name": "instance-id", "Values": [instance_id]}])["IamInstanceProfileAssociations"]
    if any(a.get("State") in ("associating", "associated") for a in associations):
        return False
    cloud.ec2.associate_iam_instance_profile(IamInstanceProfile={"Name": profile}, InstanceId=instance_id)
    return True


def leftovers(cloud: Cloud) -> list[str]:
    iam, role = cloud.iam, name(cloud)
    left = [f"instance profile {role}"] if _found(iam.get_instance_profile, InstanceProfileName=role) else []
    return left + ([f"role {role}"] if _found(iam.get_role, RoleName=role) else [])


def remove(cloud: Cloud) -> list[str]:
    """The instance profile and the role (the instances using it terminated before); what was removed."""
    iam, role = cloud.iam, name(cloud)
    removed = []
    profile = _found(iam.get_instance_profile, InstanceProfileName=role)
    if profile is not None:
        for held in profile["InstanceProfile"].get("Roles", []):
            iam.remove_role_from_instance_profile(InstanceProfileName=role, RoleName=held["RoleName"])
        iam.delete_instance_profile(InstanceProfileName=role)
        removed.append(f"instance profile {role}")
    if _found(iam.get_role, RoleName=role) is not None:
        for policy_name in iam.list_role_policies(RoleName=role)["PolicyNames"]:
            iam.delete_role_policy(RoleName=role, PolicyName=policy_name)
        iam.delete_role(RoleName=role)
        removed.append(f"role {role}")
    return removed
