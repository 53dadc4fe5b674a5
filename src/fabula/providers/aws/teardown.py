"""Removing an environment from AWS: everything carrying its tags, found by those tags (never by
a state file, which a crash may have left behind the truth), in dependency order:

  the Auto Scaling group (its policies first), listeners, load balancer, target group,
  instances, launch templates, the key pair, security-group rules then groups, the imported
  certificate, the parameters, and the VPC with its subnets and gateway only if fabula made it
  (an adopted VPC carries no tag of fabula's).

Every step skips what is already gone, so `destroy` can be run again after any failure until
`leftovers()` is empty; a second run makes no change. AWS lets go of some dependencies late
(a deleted load balancer's network interfaces hold its subnets and groups for minutes):
those deletions are retried until `Cloud.wait_timeout`. moto accepts some wrong orders AWS
refuses (a group deleted while in use): the order here is AWS's, not moto's.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from botocore.exceptions import ClientError

from fabula.providers.aws import controller_role, parameters
from fabula.providers.aws.cloud import Cloud, aws_errors, is_not_found
from fabula.providers.aws.loadbalancer import our_certificates

LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
TAGS_BATCH = 20   # elbv2 DescribeTags takes at most 20 ARNs
# how long AWS may take to delete an Auto Scaling group (its instances terminate first)
GROUP_POLL = 5.0


# -- finding the environment's resources by tag -------------------------------------------------------

def _groups(cloud: Cloud) -> list[dict[str, Any]]:
    filters = [{"Name": f"tag:{t['Key']}", "Values": [t["Value"]]} for t in cloud.tags()]
    found = []
    for page in cloud.autoscaling.get_paginator("describe_auto_scaling_groups").paginate(Filters=filters):
        found += [g for g in page["AutoScalingGroups"] if cloud.owns(g.get("Tags"))]
    return found


def _elb_owned(cloud: Cloud, arns: list[str]) -> list[str]:
    owned = []
    for start in range(0, len(arns), TAGS_BATCH):
        for description in cloud.elbv2.describe_tags(ResourceArns=arns[start:start + TAGS_BATCH])["TagDescriptions"]:
            if cloud.owns(description.get("Tags")):
                owned.append(description["ResourceArn"])
    return owned


def _load_balancers(cloud: Cloud) -> list[str]:
    arns = [lb["LoadBalancerArn"] for page in cloud.elbv2.get_paginator("describe_load_balancers").paginate()
            for lb in page["LoadBalancers"]]
    return _elb_owned(cloud, arns)


def _target_groups(cloud: Cloud) -> list[str]:
    arns = [tg["TargetGroupArn"] for page in cloud.elbv2.get_paginator("describe_target_groups").paginate()
            for tg in page["TargetGroups"]]
    return _elb_owned(cloud, arns)


def _instances(cloud: Cloud) -> list[str]:
    filters = [*cloud.filters(), {"Name": "instance-state-name", "Values": LIVE_STATES}]
    return [i["InstanceId"] for page in cloud.ec2.get_paginator("describe_instances").paginate(Filters=filters)
            for reservation in page["Reservations"] for i in reservation["Instances"]]


def _templates(cloud: Cloud) -> list[dict[str, Any]]:
    return list(cloud.ec2.describe_launch_templates(Filters=cloud.filters())["LaunchTemplates"])


def _key_pairs(cloud: Cloud) -> list[str]:
    return [k["KeyName"] for k in cloud.ec2.describe_key_pairs(Filters=cloud.filters())["KeyPairs"]]


def _security_groups(cloud: Cloud) -> list[dict[str, Any]]:
    return list(cloud.ec2.describe_security_groups(Filters=cloud.filters())["SecurityGroups"])


def _certificates(cloud: Cloud) -> list[str]:
    return our_certificates(cloud)  # the lookup ensure_certificate makes


def _vpcs(cloud: Cloud) -> list[str]:
    return [v["VpcId"] for v in cloud.ec2.describe_vpcs(Filters=cloud.filters())["Vpcs"]]


def _gateways(cloud: Cloud) -> list[dict[str, Any]]:
    return list(cloud.ec2.describe_internet_gateways(Filters=cloud.filters())["InternetGateways"])


def _subnets(cloud: Cloud) -> list[dict[str, Any]]:
    return list(cloud.ec2.describe_subnets(Filters=cloud.filters())["Subnets"])


@aws_errors
def leftovers(cloud: Cloud) -> list[str]:
    """What of the environment is still on AWS, one line each; empty once it is gone."""
    left = [f"auto scaling group {g['AutoScalingGroupName']}" for g in _groups(cloud)]
    left += [f"load balancer {arn}" for arn in _load_balancers(cloud)]
    left += [f"target group {arn}" for arn in _target_groups(cloud)]
    left += [f"instance {i}" for i in _instances(cloud)]
    left += [f"launch template {t['LaunchTemplateName']}" for t in _templates(cloud)]
    left += [f"key pair {k}" for k in _key_pairs(cloud)]
    left += controller_role.leftovers(cloud)
    left += [f"security group {g['GroupName']}" for g in _security_groups(cloud)]
    left += [f"certificate {arn}" for arn in _certificates(cloud)]
    left += [f"parameter {parameters.prefix(cloud)}{n}" for n in parameters.names(cloud)]
    left += [f"internet gateway {g['InternetGatewayId']}" for g in _gateways(cloud)]
    left += [f"subnet {s['SubnetId']}" for s in _subnets(cloud)]
    left += [f"vpc {v}" for v in _vpcs(cloud)]
    return left


# -- removing them ------------------------------------------------------------------------------------

def _gone(call: Callable[..., Any], /, **kwargs: Any) -> bool:
    """Run a deletion; True if it deleted, False if the resource was gone already."""
    try:
        call(**kwargs)
        return True
    except ClientError as exc:
        if is_not_found(exc):
            return False
        raise


def _delete(cloud: Cloud, what: str, codes: tuple[str, ...], call: Callable[..., Any], **kwargs: Any) -> bool:
    """_gone, retried while AWS says a dependency still holds the resource (`codes`)."""
    return bool(cloud.until_released(what, codes, functools.partial(_gone, call), **kwargs))


@aws_errors
def destroy(cloud: Cloud) -> list[str]:
    """Remove everything the environment has on AWS; return what was removed, one line each."""
    removed: list[str] = []
    _destroy_groups(cloud, removed)
    _destroy_load_balancers(cloud, removed)
    for arn in _target_groups(cloud):
        if _delete(cloud, f"target group {arn}", ("ResourceInUse",), cloud.elbv2.delete_target_group,
                   TargetGroupArn=arn):
            removed.append(f"target group {arn.rsplit(':', 1)[-1]}")
    instances = _instances(cloud)
    if instances:
        cloud.ec2.terminate_instances(InstanceIds=instances)
        # their network interfaces hold the security groups and subnets until they are gone
        cloud.ec2.get_waiter("instance_terminated").wait(InstanceIds=instances, WaiterConfig={
            "Delay": 5, "MaxAttempts": int(cloud.wait_timeout // 5)})
        removed += [f"instance {i}" for i in instances]
    removed += controller_role.remove(cloud)   # (the worker, which used it, is gone)
    for template in _templates(cloud):
        if _gone(cloud.ec2.delete_launch_template, LaunchTemplateId=template["LaunchTemplateId"]):
            removed.append(f"launch template {template['LaunchTemplateName']}")
    for key in _key_pairs(cloud):
        # (DeleteKeyPair answers success for a missing key: nothing to tell apart)
        cloud.ec2.delete_key_pair(KeyName=key)
        removed.append(f"key pair {key}")
    _destroy_security_groups(cloud, removed)
    for arn in _certificates(cloud):
        if _delete(cloud, f"certificate {arn}", ("ResourceInUseException",), cloud.acm.delete_certificate,
                   CertificateArn=arn):
            removed.append(f"certificate {arn.rsplit('/', 1)[-1]}")
    removed += [f"parameter {parameters.prefix(cloud)}{n}" for n in parameters.delete_secrets(cloud)]
    _destroy_network(cloud, removed)
    return removed


def _destroy_groups(cloud: Cloud, removed: list[str]) -> None:
    autoscaling = cloud.autoscaling
    for group in _groups(cloud):
        name = group["AutoScalingGroupName"]
        for policy in autoscaling.describe_policies(AutoScalingGroupName=name)["ScalingPolicies"]:
            if _gone(autoscaling.delete_policy, AutoScalingGroupName=name, PolicyName=policy["PolicyName"]):
                removed.append(f"scaling policy {policy['PolicyName']}")
        if group.get("Status") != "Delete in progress":
            # ForceDelete terminates the group's instances with it
            _gone(autoscaling.delete_auto_scaling_group, AutoScalingGroupName=name, ForceDelete=True)
        removed.append(f"auto scaling group {name}")
    # the group's deletion is asynchronous on AWS: its instances hold the target group and groups
    waited = 0.0
    while _groups(cloud) and waited < cloud.wait_timeout:
        cloud.sleep(GROUP_POLL)
        waited += GROUP_POLL


def _destroy_load_balancers(cloud: Cloud, removed: list[str]) -> None:
    elbv2 = cloud.elbv2
    balancers = _load_balancers(cloud)
    for arn in balancers:
        for listener in elbv2.describe_listeners(LoadBalancerArn=arn)["Listeners"]:
            if _gone(elbv2.delete_listener, ListenerArn=listener["ListenerArn"]):
                removed.append(f"listener {listener['Port']}")
        if _gone(elbv2.delete_load_balancer, LoadBalancerArn=arn):
            removed.append(f"load balancer {arn.split('/')[-2]}")
    if balancers:
        elbv2.get_waiter("load_balancers_deleted").wait(LoadBalancerArns=balancers, WaiterConfig={
            "Delay": 5, "MaxAttempts": int(cloud.wait_timeout // 5)})


def _destroy_security_groups(cloud: Cloud, removed: list[str]) -> None:
    ec2 = cloud.ec2
    groups = _security_groups(cloud)
    if not groups:
        return
    ids = [g["GroupId"] for g in groups]
    rules = ec2.describe_security_group_rules(Filters=[{"Name": "group-id", "Values": ids}])["SecurityGroupRules"]
    # rules first: a group another group's rule refers to cannot be deleted on AWS
    by_group: dict[str, list[str]] = {}
    for rule in rules:
        if not rule.get("IsEgress"):
            by_group.setdefault(rule["GroupId"], []).append(rule["SecurityGroupRuleId"])
    for group_id, rule_ids in by_group.items():
        if _gone(ec2.revoke_security_group_ingress, GroupId=group_id, SecurityGroupRuleIds=rule_ids):
            removed.append(f"{len(rule_ids)} rules of {group_id}")
    for group in groups:
        if _delete(cloud, f"security group {group['GroupName']}", ("DependencyViolation",),
                   ec2.delete_security_group, GroupId=group["GroupId"]):
            removed.append(f"security group {group['GroupName']}")


def _destroy_network(cloud: Cloud, removed: list[str]) -> None:
    """The VPC fabula made (tagged; an adopted one is not), its gateway and subnets; also a
    gateway or subnet a crash left without its VPC's tag lookup finding it."""
    ec2 = cloud.ec2
    for gateway in _gateways(cloud):
        gateway_id = gateway["InternetGatewayId"]
        for attachment in gateway.get("Attachments", []):
            _gone(ec2.detach_internet_gateway, InternetGatewayId=gateway_id, VpcId=attachment["VpcId"])
        if _gone(ec2.delete_internet_gateway, InternetGatewayId=gateway_id):
            removed.append(f"internet gateway {gateway_id}")
    for subnet in _subnets(cloud):
        if _delete(cloud, f"subnet {subnet['SubnetId']}", ("DependencyViolation",), ec2.delete_subnet,
                   SubnetId=subnet["SubnetId"]):
            removed.append(f"subnet {subnet['SubnetId']}")
    for vpc_id in _vpcs(cloud):
        if _delete(cloud, f"vpc {vpc_id}", ("DependencyViolation",), ec2.delete_vpc, VpcId=vpc_id):
            removed.append(f"vpc {vpc_id}")
