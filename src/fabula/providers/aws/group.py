"""The web tier as an Auto Scaling group: one launch template per release (the seed's "a new AS
Launch Configuration is created for the new revision of the code ... the AS Group is then
updated to point to it"; launch configurations are deprecated, templates replace them), the group
attached to the target group with ELB health checks, and a target-tracking policy on requests
per target.

One template per release rather than versions of one template: moto crashes launching from a
version made by CreateLaunchTemplateVersion with UserData, and a template per release is what
a rollback points back at.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from fabula.providers.aws.cloud import AwsError, Cloud, aws_errors, error_code

RELEASE = re.compile(r"[0-9a-f]{7,40}", re.ASCII)   # fabula's release ids: a commit's first 12 digits
# Debian's own public parameters: the current Debian 12 image of the region
DEBIAN_IMAGE_PARAMETER = "/aws/service/debian/release/12/latest/{arch}"
ROOT_VOLUME_GIB = 20
# a new web server is converged over SSH before it passes the health check: the group must not
# count it unhealthy (and replace it) meanwhile
HEALTH_CHECK_GRACE = 900
POLICY_SUFFIX = "requests-per-target"


@dataclass(frozen=True)
class Template:
    id: str
    name: str
    release: str


@dataclass(frozen=True)
class GroupSize:
    min: int
    desired: int
    max: int


def group_name(cloud: Cloud) -> str:
    return cloud.name("web")


@aws_errors
def resolve_image(cloud: Cloud, ami: str | None, architecture: str) -> str:
    """`aws.ami`, or the region's current Debian 12 image for the instance types' architecture."""
    if ami is not None:
        return ami
    name = DEBIAN_IMAGE_PARAMETER.format(arch=architecture)
    try:
        return str(cloud.ssm.get_parameter(Name=name)["Parameter"]["Value"])
    except ClientError as exc:
        if error_code(exc) != "ParameterNotFound":
            raise
        raise AwsError(f"no Debian 12 image is published in {cloud.region} ({name} is missing)",
                       "give `aws.ami` an image of this region") from None


@aws_errors
def ensure_launch_template(cloud: Cloud, *, release: str, image: str, instance_type: str,
                           security_group_ids: Sequence[str], key_name: str | None = None,
                           user_data: str | None = None) -> Template:
    """The release's launch template, made once: its instances are tagged with the environment,
    role web and the release (moto's describe shows the group's current template for every
    instance, so the tag is what says which release an instance runs)."""
    if not RELEASE.fullmatch(release):
        raise AwsError(f"release id {release!r} is not a commit's hex digits", "build releases with fabula")
    ec2 = cloud.ec2
    found = ec2.describe_launch_templates(Filters=cloud.filters(**{"fabula:release": release}))["LaunchTemplates"]
    if found:
        return Template(found[0]["LaunchTemplateId"], found[0]["LaunchTemplateName"], release)
    name = cloud.name(f"web-{release}")
    images = ec2.describe_images(ImageIds=[image])["Images"]
    if not images:
        raise AwsError(f"image {image} does not exist in {cloud.region}",
                       "give `aws.ami` an image of this region (or leave it out for Debian 12's current one)")
    instance_tags = {"fabula:role": "web", "fabula:release": release}
    data: dict[str, Any] = {
        "ImageId": image,
        "InstanceType": instance_type,
        "SecurityGroupIds": list(security_group_ids),
        "BlockDeviceMappings": [{"DeviceName": images[0].get("RootDeviceName", "/dev/xvda"), "Ebs": {
            "Encrypted": True, "VolumeType": "gp3", "VolumeSize": ROOT_VOLUME_GIB, "DeleteOnTermination": True}}],
        # IMDSv2 only: a request forged through the app cannot read the instance's credentials
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1},
        "TagSpecifications": [{"ResourceType": kind, "Tags": cloud.tags(cloud.name("web"), **instance_tags)}
                              for kind in ("instance", "volume")],
    }
    if key_name is not None:
        data["KeyName"] = key_name
    if user_data is not None:
        data["UserData"] = user_data
    made = ec2.create_launch_template(LaunchTemplateName=name, LaunchTemplateData=data,
                                      TagSpecifications=cloud.tag_spec("launch-template", name, **{
                                          "fabula:release": release}))["LaunchTemplate"]
    return Template(made["LaunchTemplateId"], made["LaunchTemplateName"], release)


def _describe_group(cloud: Cloud) -> dict[str, Any] | None:
    groups = cloud.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[group_name(cloud)])[
        "AutoScalingGroups"]
    if not groups:
        return None
    if not cloud.owns(groups[0].get("Tags")):
        raise AwsError(f"Auto Scaling group {group_name(cloud)} exists but is not environment {cloud.tag_value}'s",
                       "delete or rename it in the AWS console")
    return dict(groups[0])


@aws_errors
def ensure_group(cloud: Cloud, *, template: Template, target_group_arn: str, subnet_ids: Sequence[str],
                 size: GroupSize) -> str:
    """The group, made on the first run with `template` and `size.desired`; later runs keep its
    template (a deploy's business: point_group) and its desired count (the scaling policy's and
    `fabula scale`'s), and correct min, max, subnets, health checks and the target group."""
    name = group_name(cloud)
    group = _describe_group(cloud)
    subnets = ",".join(subnet_ids)
    if group is None:
        cloud.autoscaling.create_auto_scaling_group(
            AutoScalingGroupName=name,
            LaunchTemplate={"LaunchTemplateId": template.id, "Version": "$Latest"},
            MinSize=size.min, MaxSize=size.max, DesiredCapacity=size.desired,
            VPCZoneIdentifier=subnets, TargetGroupARNs=[target_group_arn],
            HealthCheckType="ELB", HealthCheckGracePeriod=HEALTH_CHECK_GRACE,
            Tags=[{**tag, "PropagateAtLaunch": True, "ResourceId": name, "ResourceType": "auto-scaling-group"}
                  for tag in cloud.tags(name, **{"fabula:role": "web"})])
        return name
    changes: dict[str, Any] = {}
    if (group["MinSize"], group["MaxSize"]) != (size.min, size.max):
        changes.update(MinSize=size.min, MaxSize=size.max)
        if not size.min <= group["DesiredCapacity"] <= size.max:
            changes["DesiredCapacity"] = min(max(group["DesiredCapacity"], size.min), size.max)
    if sorted(group.get("VPCZoneIdentifier", "").split(",")) != sorted(subnet_ids):
        changes["VPCZoneIdentifier"] = subnets
    if group.get("HealthCheckType") != "ELB" or group.get("HealthCheckGracePeriod") != HEALTH_CHECK_GRACE:
        changes.update(HealthCheckType="ELB", HealthCheckGracePeriod=HEALTH_CHECK_GRACE)
    if changes:
        cloud.autoscaling.update_auto_scaling_group(AutoScalingGroupName=name, **changes)
    if target_group_arn not in group.get("TargetGroupARNs", []):
        cloud.autoscaling.attach_load_balancer_target_groups(AutoScalingGroupName=name,
                                                             TargetGroupARNs=[target_group_arn])
    return name


@aws_errors
def point_group(cloud: Cloud, template: Template) -> bool:
    """Launch the group's next instances from `template` (a deploy, a rollback); True if it changed."""
    group = _describe_group(cloud)
    if group is None:
        raise AwsError(f"the web group {group_name(cloud)} does not exist", "run `fabula create` first")
    current = (group.get("LaunchTemplate") or {}).get("LaunchTemplateId")
    if current == template.id:
        return False
    cloud.autoscaling.update_auto_scaling_group(AutoScalingGroupName=group_name(cloud), LaunchTemplate={
        "LaunchTemplateId": template.id, "Version": "$Latest"})
    return True


@aws_errors
def group_template(cloud: Cloud) -> str | None:
    """The release of the group's launch template; None before the group exists."""
    group = _describe_group(cloud)
    if group is None or not group.get("LaunchTemplate"):
        return None
    template_id = group["LaunchTemplate"]["LaunchTemplateId"]
    found = cloud.ec2.describe_launch_templates(LaunchTemplateIds=[template_id])["LaunchTemplates"]
    tags = {t["Key"]: t["Value"] for t in (found[0].get("Tags") or [])} if found else {}
    return tags.get("fabula:release")


@aws_errors
def set_desired(cloud: Cloud, count: int) -> None:
    cloud.autoscaling.set_desired_capacity(AutoScalingGroupName=group_name(cloud), DesiredCapacity=count,
                                           HonorCooldown=False)


@aws_errors
def terminate_member(cloud: Cloud, instance_id: str) -> None:
    """Terminate a web group's instance without a replacement: the desired count goes down by one."""
    cloud.autoscaling.terminate_instance_in_auto_scaling_group(InstanceId=instance_id,
                                                               ShouldDecrementDesiredCapacity=True)


@aws_errors
def set_processes(cloud: Cloud, processes: Sequence[str], suspend: bool) -> None:
    """Suspend or resume the group's own processes (Launch, Terminate, ReplaceUnhealthy...)."""
    call = cloud.autoscaling.suspend_processes if suspend else cloud.autoscaling.resume_processes
    call(AutoScalingGroupName=group_name(cloud), ScalingProcesses=list(processes))


@aws_errors
def suspended_processes(cloud: Cloud) -> list[str]:
    group = _describe_group(cloud)
    return sorted(p["ProcessName"] for p in (group or {}).get("SuspendedProcesses", []))


def resource_label(load_balancer_arn: str, target_group_arn: str) -> str:
    """ALBRequestCountPerTarget's label: app/<lb>/<id>/targetgroup/<tg>/<id>."""
    return f"{load_balancer_arn.split(':loadbalancer/', 1)[1]}/{target_group_arn.split(':', 5)[5]}"


@aws_errors
def ensure_scaling_policy(cloud: Cloud, *, load_balancer_arn: str, target_group_arn: str,
                          requests_per_second: float | None) -> str | None:
    """The policy's name: target tracking on requests per target (`autoscaling.target`, per second in fabula.yml;
    AWS counts per minute). None (a fixed group: min = max) removes the policy."""
    autoscaling = cloud.autoscaling
    name = cloud.name(POLICY_SUFFIX)
    policies = autoscaling.describe_policies(AutoScalingGroupName=group_name(cloud), PolicyNames=[name])[
        "ScalingPolicies"]
    if requests_per_second is None:
        for policy in policies:
            autoscaling.delete_policy(AutoScalingGroupName=group_name(cloud), PolicyName=policy["PolicyName"])
        return None
    wanted = {
        "PredefinedMetricSpecification": {"PredefinedMetricType": "ALBRequestCountPerTarget",
                                          "ResourceLabel": resource_label(load_balancer_arn, target_group_arn)},
        "TargetValue": round(requests_per_second * 60, 3),
        "DisableScaleIn": False,
    }
    if policies:
        have = policies[0].get("TargetTrackingConfiguration") or {}
        if (have.get("PredefinedMetricSpecification") == wanted["PredefinedMetricSpecification"]
                and float(have.get("TargetValue", -1)) == wanted["TargetValue"]
                and not have.get("DisableScaleIn", False)):
            return name
    autoscaling.put_scaling_policy(AutoScalingGroupName=group_name(cloud), PolicyName=name,
                                   PolicyType="TargetTrackingScaling", TargetTrackingConfiguration=wanted)
    return name
