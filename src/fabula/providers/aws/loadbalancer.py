"""The Application Load Balancer: its certificate (given as an ACM ARN, or imported from PEM
files and re-imported in place when they change), the web servers' target group with the seed's
health check, the load balancer in the two subnets, a listener on 443 with a TLS 1.2+ policy and
one on 80 that redirects to it.

Names of load balancers and target groups are unique per region and at most 32 characters
(Cloud.short_name); one found by name is used only if it carries the environment's tags.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fabula.providers.aws.cloud import AwsError, Cloud, aws_errors, described

HTTPS_PORT = 443   # the web servers' nginx
# TLS 1.3 and 1.2 only, forward-secret ciphers: the ALB's counterpart of Mozilla's "intermediate"
TLS_POLICY = "ELBSecurityPolicy-TLS13-1-2-2021-06"
# the seed's health check (HTTPS, 443, /healthcheck.html), as short as an ALB allows: the
# local provider checks every second and takes a server out after 2 failures; 5 s is AWS's floor
HEALTH_CHECK: dict[str, Any] = {
    "HealthCheckProtocol": "HTTPS",
    "HealthCheckPort": "traffic-port",
    "HealthCheckPath": "/healthcheck.html",
    "HealthCheckIntervalSeconds": 5,
    "HealthCheckTimeoutSeconds": 4,
    "HealthyThresholdCount": 2,
    "UnhealthyThresholdCount": 2,
}
MATCHER = {"HttpCode": "200"}
# the header the local provider's HAProxy adds to every response (ALB listener attribute)
HSTS_ATTRIBUTE = "routing.http.response.strict_transport_security.header_value"
HSTS = "max-age=63072000"   # two years, as providers/haproxy's HSTS_MAX_AGE
# a drained server's requests in flight may take this long (AWS's default, 300 s, holds a deploy)
DEREGISTRATION_DELAY = "30"


@dataclass(frozen=True)
class LoadBalancerIds:
    arn: str
    dns_name: str
    target_group_arn: str
    listener_arns: tuple[str, ...]


# -- the certificate --------------------------------------------------------------------------------

def _split_pem(pem: bytes) -> tuple[bytes, bytes | None]:
    """The leaf certificate and the rest of the chain (ACM takes them apart)."""
    certificates = x509.load_pem_x509_certificates(pem)
    encode = serialization.Encoding.PEM
    leaf = certificates[0].public_bytes(encode)
    chain = b"".join(c.public_bytes(encode) for c in certificates[1:])
    return leaf, chain or None


def _same_certificate(a: bytes | str, b: bytes) -> bool:
    der = serialization.Encoding.DER
    first = x509.load_pem_x509_certificate(a.encode() if isinstance(a, str) else a)
    return first.public_bytes(der) == x509.load_pem_x509_certificate(b).public_bytes(der)


def our_certificates(cloud: Cloud) -> list[str]:
    # every key type: ListCertificates returns only RSA 2048 ones unless told
    key_types = ["RSA_1024", "RSA_2048", "RSA_3072", "RSA_4096", "EC_prime256v1", "EC_secp384r1", "EC_secp521r1"]
    found = []
    for page in cloud.acm.get_paginator("list_certificates").paginate(Includes={"keyTypes": key_types}):
        for summary in page["CertificateSummaryList"]:
            if summary.get("Type", "IMPORTED") != "IMPORTED":
                continue
            tags = cloud.acm.list_tags_for_certificate(CertificateArn=summary["CertificateArn"]).get("Tags", [])
            if cloud.owns(tags):
                found.append(summary["CertificateArn"])
    return found


@aws_errors
def ensure_certificate(cloud: Cloud, certificate_pem: bytes, key_pem: bytes) -> str:
    """The certificate imported into ACM, re-imported into the same ARN when the files changed
    (the listener keeps its ARN: rotation needs nothing else). The key is sent to ACM only."""
    leaf, chain = _split_pem(certificate_pem)
    found = our_certificates(cloud)
    material: dict[str, Any] = {"Certificate": leaf, "PrivateKey": key_pem, **({"CertificateChain": chain} if chain
                                                                                 else {})}
    if found:
        arn = found[0]
        current = cloud.acm.get_certificate(CertificateArn=arn)["Certificate"]
        if not _same_certificate(current, leaf):
            cloud.acm.import_certificate(CertificateArn=arn, **material)
        return arn
    return str(cloud.acm.import_certificate(**material, Tags=cloud.tags(cloud.name("certificate")))[
        "CertificateArn"])


# -- target group, load balancer, listeners ----------------------------------------------------------

def _check_owned(cloud: Cloud, arn: str, what: str) -> None:
    descriptions = cloud.elbv2.describe_tags(ResourceArns=[arn])["TagDescriptions"]
    if not descriptions or not cloud.owns(descriptions[0].get("Tags")):
        raise AwsError(f"{what} {arn.rsplit(':', 1)[-1]} exists but is not environment {cloud.tag_value}'s "
                       "(its tags differ)", "delete or rename it in the AWS console, or give this environment "
                       "another name")


@aws_errors
def ensure_target_group(cloud: Cloud, vpc_id: str) -> str:
    elbv2 = cloud.elbv2
    name = cloud.short_name("web")
    groups = described(elbv2.describe_target_groups, "TargetGroups", "TargetGroupNotFound", Names=[name])
    if groups:
        group = groups[0]
        arn = str(group["TargetGroupArn"])
        _check_owned(cloud, arn, "target group")
        if group["VpcId"] != vpc_id:
            raise AwsError(f"target group {name} is in {group['VpcId']}, the environment's VPC is {vpc_id}",
                           "run `fabula destroy` for the environment, then `fabula create`")
        drift = {k: v for k, v in HEALTH_CHECK.items() if group.get(k) != v}
        if drift or group.get("Matcher", {}).get("HttpCode") != MATCHER["HttpCode"]:
            elbv2.modify_target_group(TargetGroupArn=arn, **HEALTH_CHECK, Matcher=MATCHER)
        attributes = {a["Key"]: a["Value"] for a in elbv2.describe_target_group_attributes(
            TargetGroupArn=arn)["Attributes"]}
        if attributes.get("deregistration_delay.timeout_seconds") == DEREGISTRATION_DELAY:
            return arn
    else:
        arn = str(elbv2.create_target_group(
            Name=name, Protocol="HTTPS", Port=HTTPS_PORT, VpcId=vpc_id, TargetType="instance", **HEALTH_CHECK,
            Matcher=MATCHER, Tags=cloud.tags(name))["TargetGroups"][0]["TargetGroupArn"])
    elbv2.modify_target_group_attributes(TargetGroupArn=arn, Attributes=[
        {"Key": "deregistration_delay.timeout_seconds", "Value": DEREGISTRATION_DELAY}])
    return arn


@aws_errors
def ensure_load_balancer(cloud: Cloud, subnet_ids: Sequence[str], security_group_id: str) -> tuple[str, str]:
    """The ALB (internet-facing, IPv4) in the subnets, with the lb group: (its ARN, its DNS name)."""
    elbv2 = cloud.elbv2
    name = cloud.short_name("lb")
    found = described(elbv2.describe_load_balancers, "LoadBalancers", "LoadBalancerNotFound", Names=[name])
    if not found:
        created = elbv2.create_load_balancer(
            Name=name, Subnets=list(subnet_ids), SecurityGroups=[security_group_id], Scheme="internet-facing",
            Type="application", IpAddressType="ipv4", Tags=cloud.tags(name))["LoadBalancers"][0]
        return str(created["LoadBalancerArn"]), str(created["DNSName"])
    balancer = found[0]
    arn = str(balancer["LoadBalancerArn"])
    _check_owned(cloud, arn, "load balancer")
    if balancer.get("SecurityGroups") != [security_group_id]:
        elbv2.set_security_groups(LoadBalancerArn=arn, SecurityGroups=[security_group_id])
    if sorted(z["SubnetId"] for z in balancer.get("AvailabilityZones", [])) != sorted(subnet_ids):
        elbv2.set_subnets(LoadBalancerArn=arn, Subnets=list(subnet_ids))
    return arn, str(balancer["DNSName"])


def _https_listener(target_group_arn: str, certificate_arn: str) -> dict[str, Any]:
    return {"Protocol": "HTTPS", "SslPolicy": TLS_POLICY, "Certificates": [{"CertificateArn": certificate_arn}],
            "DefaultActions": [{"Type": "forward", "TargetGroupArn": target_group_arn}]}


def _redirect_listener(https_port: int) -> dict[str, Any]:
    return {"Protocol": "HTTP", "DefaultActions": [{"Type": "redirect", "RedirectConfig": {
        "Protocol": "HTTPS", "Port": str(https_port), "Host": "#{host}", "Path": "/#{path}", "Query": "#{query}",
        "StatusCode": "HTTP_301"}}]}


def _same_listener(have: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """The parts fabula sets, compared (AWS adds defaults of its own to what it describes)."""
    if have.get("Protocol") != wanted["Protocol"]:
        return False
    # (moto describes an HTTP listener with a TLS policy of its own: only HTTPS's is compared)
    if wanted["Protocol"] == "HTTPS" and have.get("SslPolicy") != wanted["SslPolicy"]:
        return False
    if [c.get("CertificateArn") for c in have.get("Certificates") or []] != \
            [c["CertificateArn"] for c in wanted.get("Certificates", [])]:
        return False
    actions, wanted_actions = have.get("DefaultActions") or [], wanted["DefaultActions"]
    if len(actions) != 1 or actions[0].get("Type") != wanted_actions[0]["Type"]:
        return False
    if wanted_actions[0]["Type"] == "forward":
        return bool(actions[0].get("TargetGroupArn") == wanted_actions[0]["TargetGroupArn"])
    redirect = actions[0].get("RedirectConfig") or {}
    return all(redirect.get(k) == v for k, v in wanted_actions[0]["RedirectConfig"].items())


@aws_errors
def ensure_listeners(cloud: Cloud, load_balancer_arn: str, target_group_arn: str, certificate_arn: str,
                     https_port: int, http_port: int) -> tuple[str, ...]:
    """Exactly two listeners: HTTPS on `https_port` forwarding to the web servers, HTTP on
    `http_port` redirecting to it (a listener on another port, e.g. a port changed in
    fabula.yml, is removed)."""
    elbv2 = cloud.elbv2
    have = {listener["Port"]: listener for listener in elbv2.describe_listeners(
        LoadBalancerArn=load_balancer_arn)["Listeners"]}
    wanted = {https_port: _https_listener(target_group_arn, certificate_arn), http_port: _redirect_listener(https_port)}
    arns = []
    for port, listener in wanted.items():
        current = have.get(port)
        if current is None:
            made = elbv2.create_listener(LoadBalancerArn=load_balancer_arn, Port=port, **listener,
                                         Tags=cloud.tags())["Listeners"][0]
            arns.append(str(made["ListenerArn"]))
            continue
        if not _same_listener(current, listener):
            elbv2.modify_listener(ListenerArn=current["ListenerArn"], Port=port, **listener)
        arns.append(str(current["ListenerArn"]))
    for port, listener in have.items():
        if port not in wanted:
            elbv2.delete_listener(ListenerArn=listener["ListenerArn"])
    _ensure_hsts(cloud, arns[0])
    return tuple(arns)


def _ensure_hsts(cloud: Cloud, https_listener_arn: str) -> None:
    """Browsers told to use HTTPS only, as by the local provider's load balancer."""
    attributes = {a["Key"]: a["Value"] for a in cloud.elbv2.describe_listener_attributes(
        ListenerArn=https_listener_arn)["Attributes"]}
    if attributes.get(HSTS_ATTRIBUTE) != HSTS:
        cloud.elbv2.modify_listener_attributes(ListenerArn=https_listener_arn,
                                               Attributes=[{"Key": HSTS_ATTRIBUTE, "Value": HSTS}])
