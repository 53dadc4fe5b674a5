"""Every AWS resource of an environment but its instances, ensured in dependency order from
fabula.yml: network, security groups, certificate, target group, load balancer, listeners,
secrets, and (once a release exists) its launch template, the web group and its scaling policy.

Each step finds what exists by tag and makes only what is missing: a second run with nothing
changed makes no change (the unit tests count the calls).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fabula.config.schema import EnvironmentConfig
from fabula.providers.aws import group as web_group
from fabula.providers.aws.cloud import AwsError, Cloud
from fabula.providers.aws.group import GroupSize, Template
from fabula.providers.aws.loadbalancer import (
    ensure_certificate,
    ensure_listeners,
    ensure_load_balancer,
    ensure_target_group,
)
from fabula.providers.aws.network import (
    Network,
    ensure_network,
    ensure_security_groups,
    planned_permissions,
    server_groups,
)
from fabula.providers.aws.parameters import put_secrets
from fabula.providers.base import IngressRule


@dataclass(frozen=True)
class ControlPlane:
    network: Network
    security_groups: dict[str, str]   # kind (common, web, ..., lb, fenced) -> group id
    certificate_arn: str
    target_group_arn: str
    load_balancer_arn: str
    dns_name: str
    listener_arns: tuple[str, ...]
    template: Template | None          # None until a release exists
    group: str | None
    policy: str | None                 # the scaling policy's name; None for a fixed group


def ensure_control_plane(cloud: Cloud, env: EnvironmentConfig, *, role_rules: Mapping[str, Sequence[IngressRule]],
                         certificate: tuple[bytes, bytes] | None, secrets: Mapping[str, str],
                         release: str | None = None, key_name: str | None = None) -> ControlPlane:
    """`certificate` is (PEM chain, PEM key) to import when `aws.certificate_arn` is not given
    (lb.certificate and lb.key, or the environment's own self-signed one)."""
    aws = env.aws
    if aws is None:
        raise AwsError("the environment has no `aws:` section", "set `provider: aws` and its `aws:` section")
    network = ensure_network(cloud, aws.vpc)
    permissions = planned_permissions(role_rules, env.admin_sources, (env.lb.https_port, env.lb.http_port))
    groups = ensure_security_groups(cloud, network, permissions)
    if aws.certificate_arn is not None:
        certificate_arn = aws.certificate_arn
    elif certificate is not None:
        certificate_arn = ensure_certificate(cloud, *certificate)
    else:
        raise AwsError("no certificate for the load balancer",
                       "give `aws.certificate_arn`, or `lb.certificate` and `lb.key`")
    target_group_arn = ensure_target_group(cloud, network.vpc_id)
    load_balancer_arn, dns_name = ensure_load_balancer(cloud, network.subnet_ids, groups["lb"])
    listener_arns = ensure_listeners(cloud, load_balancer_arn, target_group_arn, certificate_arn,
                                     env.lb.https_port, env.lb.http_port)
    put_secrets(cloud, secrets)
    template = group = policy = None
    if release is not None:
        template, group, policy = ensure_web_tier(
            cloud, env, release=release, network=network, security_groups=groups, key_name=key_name,
            target_group_arn=target_group_arn, load_balancer_arn=load_balancer_arn)
    return ControlPlane(network, groups, certificate_arn, target_group_arn, load_balancer_arn, dns_name,
                        listener_arns, template, group, policy)


def ensure_web_tier(cloud: Cloud, env: EnvironmentConfig, *, release: str, network: Network,
                    security_groups: Mapping[str, str], target_group_arn: str, load_balancer_arn: str,
                    key_name: str | None) -> tuple[Template, str, str | None]:
    """The release's launch template, the web group (made with it at its desired count; an
    existing group keeps its own template: web_group.point_group is a deploy's) and its scaling
    policy: (the template, the group's name, the policy's name or None)."""
    aws = env.aws
    assert aws is not None  # the caller's environment is an aws one
    image = web_group.resolve_image(cloud, aws.ami, aws.instance_types.architecture())
    template = web_group.ensure_launch_template(
        cloud, release=release, image=image, instance_type=aws.instance_types.web,
        security_group_ids=[security_groups[kind] for kind in server_groups("web")], key_name=key_name)
    settings = env.web_group()
    assert settings.desired is not None and settings.max is not None  # set by the schema
    group = web_group.ensure_group(cloud, template=template, target_group_arn=target_group_arn,
                                   subnet_ids=network.subnet_ids,
                                   size=GroupSize(settings.min, settings.desired, settings.max))
    # a fixed group (min = max) has nothing to track
    target = settings.target if settings.min < settings.max else None
    policy = web_group.ensure_scaling_policy(cloud, load_balancer_arn=load_balancer_arn,
                                             target_group_arn=target_group_arn, requests_per_second=target)
    return template, group, policy
