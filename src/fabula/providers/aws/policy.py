"""The IAM policy fabula needs on AWS, made from the calls it makes: the Cloud's call counter
names each call as `<botocore service>.<operation>`, which is IAM's `<prefix>:<action>` but for
the services whose IAM prefix differs and S3's operations whose permission has another name.
The README's policy is this module's output for a whole environment's life (create, scale,
deploy's load-balancer calls, fencing, the shared store, destroy): a unit test keeps them equal."""
from __future__ import annotations

import json
from collections.abc import Iterable

PREFIX = {"elbv2": "elasticloadbalancing"}
# S3 operations whose permission is named otherwise (AWS's "Actions, resources and condition keys")
S3_PERMISSION = {"HeadBucket": "ListBucket", "HeadObject": "GetObject",
                 "PutPublicAccessBlock": "PutBucketPublicAccessBlock", "CreateBucket": "CreateBucket"}
# calls that need no permission
FREE = frozenset({"sts.GetCallerIdentity"})
# permissions AWS checks on fabula's behalf: the Elastic Load Balancing and Auto Scaling service
# roles are made by AWS the first time an account uses them, a resource created with tags needs
# the service's tagging permission too, and giving the worker its instance role is passing it
IMPLIED = ("iam:CreateServiceLinkedRole", "ec2:CreateTags", "elasticloadbalancing:AddTags",
           "acm:AddTagsToCertificate", "ssm:AddTagsToResource", "autoscaling:CreateOrUpdateTags", "iam:TagRole",
           "iam:TagInstanceProfile", "iam:PassRole")
# calls made only when something changed since the last create (a rotated certificate, a
# failover, a deploy, a setting edited in the console, no `aws.ami`), which the unit tests'
# environment life does not reach; a unit test checks that the code makes each of them
ON_CHANGE = ("acm.GetCertificate", "autoscaling.AttachLoadBalancerTargetGroups",
             "autoscaling.UpdateAutoScalingGroup", "ec2.AssociateIamInstanceProfile", "ec2.CreateTags",
             "ec2.ReplaceRoute", "elbv2.ModifyListener", "elbv2.ModifyTargetGroup", "elbv2.SetSecurityGroups",
             "elbv2.SetSubnets", "iam.PutRolePolicy", "ssm.GetParameter")


# the calls of fabula's program on the worker (its instance role's policy: controller_role.py):
# those of a round in which the group launched an instance and terminated another (a unit test
# keeps them equal), and a server's security groups set again when they differ (a failover's)
CONTROLLER_CALLS = (
    "autoscaling.DescribeAutoScalingGroups", "ec2.DescribeInstances", "ec2.DescribeSecurityGroups",
    "elbv2.DeregisterTargets", "elbv2.DescribeLoadBalancers", "elbv2.DescribeTargetGroups",
    "elbv2.DescribeTargetHealth", "elbv2.RegisterTargets", "s3.DeleteObject", "s3.GetObject", "s3.HeadBucket",
    "s3.PutObject")
CONTROLLER_ON_CHANGE = ("ec2.ModifyInstanceAttribute",)


def iam_actions(calls: Iterable[str], *, with_implied: bool = True) -> list[str]:
    """IAM's action names for the Cloud counter's call names (sorted, each once); `with_implied`:
    and those a whole environment's life needs beside its calls (IMPLIED, ON_CHANGE)."""
    actions = set(IMPLIED if with_implied else ())
    for call in [*calls, *(ON_CHANGE if with_implied else ())]:
        if call in FREE:
            continue
        service, _, operation = call.partition(".")
        if service == "s3":
            operation = S3_PERMISSION.get(operation, operation)
        actions.add(f"{PREFIX.get(service, service)}:{operation}")
    return sorted(actions)


def policy_document(actions: Iterable[str]) -> str:
    """An IAM policy allowing exactly `actions` (on every resource: most of these calls take no
    resource-level condition, and the environment's resources are named only once made)."""
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "Fabula", "Effect": "Allow", "Action": sorted(actions), "Resource": "*"}]}, indent=2)
