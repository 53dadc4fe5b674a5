"""The aws provider's control plane against moto in-process: a first ensure makes every resource
with the seed's names, the environment's tags and the architecture's rules; a second one makes
no change; destroy after a crash finds everything by its tags and a second destroy is a no-op;
another environment's resources are never touched; nothing secret is printed."""
from __future__ import annotations

import datetime
import logging
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fabula.config.schema import EnvironmentConfig
from fabula.providers.aws import group as web_group
from fabula.providers.aws import parameters, teardown
from fabula.providers.aws.cloud import AwsError, Cloud
from fabula.providers.aws.controlplane import ControlPlane, ensure_control_plane
from fabula.providers.aws.loadbalancer import HSTS_ATTRIBUTE, TLS_POLICY, ensure_certificate, ensure_target_group
from fabula.providers.aws.network import ensure_network, ensure_security_groups, planned_permissions
from fabula.providers.aws.statebucket import StateBucket, StateConflict
from fabula.providers.haproxy import HSTS_MAX_AGE
from fabula.roles import ROLES
from tests.unit.conftest import AWS_REGION

REGION = AWS_REGION
SECRET = "s3cr3t-value-never-shown"
RELEASE = "0123456789ab"


def cloud(project: str = "shop", env: str = "production") -> Cloud:
    return Cloud.open(project, env, REGION, session=boto3.Session(region_name=REGION), sleep=lambda _: None)


def image() -> str:
    return str(boto3.client("ec2", region_name=REGION).describe_images(Owners=["amazon"])["Images"][0]["ImageId"])


def environment(ami: str, **aws: Any) -> EnvironmentConfig:
    return EnvironmentConfig.model_validate({
        "provider": "aws",
        "aws": {"region": REGION, "vpc": {"cidr": "10.40.0.0/16"}, "ami": ami, "state_bucket": "shop-state", **aws},
        "admin_sources": ["198.51.100.0/24"],
        "autoscaling": {"min": 2, "desired": 2, "max": 8, "metric": "requests", "target": 100},
    })


def certificate(name: str = "shop.example.com") -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


# the roles' own rules: fabula's architecture, resolved by the provider to group references
ROLE_RULES = {name: role.ingress(None) for name, role in ROLES.items()}  # type: ignore[arg-type]


def ensure(c: Cloud, env: EnvironmentConfig, pem: tuple[bytes, bytes], release: str | None = RELEASE) -> ControlPlane:
    return ensure_control_plane(c, env, role_rules=ROLE_RULES, certificate=pem,
                                secrets={"django_secret_key": SECRET, "db_password": "pw-" + SECRET},
                                release=release)


def ingress(group_id: str) -> set[tuple[int, str]]:
    """A group's ingress rules as (port, source: a group's name or a CIDR)."""
    ec2 = boto3.client("ec2", region_name=REGION)
    names = {g["GroupId"]: g["GroupName"] for g in ec2.describe_security_groups()["SecurityGroups"]}
    rules = ec2.describe_security_group_rules(Filters=[{"Name": "group-id", "Values": [group_id]}])
    return {(r["FromPort"], names[r["ReferencedGroupInfo"]["GroupId"]] if r.get("ReferencedGroupInfo")
             else r.get("CidrIpv4") or r.get("CidrIpv6"))
            for r in rules["SecurityGroupRules"] if not r["IsEgress"]}


def hsts(elbv2: Any, listener_arn: str) -> str | None:
    attributes = elbv2.describe_listener_attributes(ListenerArn=listener_arn)["Attributes"]
    return next((a["Value"] for a in attributes if a["Key"] == HSTS_ATTRIBUTE), None)


def test_a_first_ensure_makes_everything_named_tagged_and_wired(aws: None):
    c, pem = cloud(), certificate()
    plane = ensure(c, environment(image()), pem)
    ec2, elbv2, asg = (boto3.client(s, region_name=REGION) for s in ("ec2", "elbv2", "autoscaling"))

    vpc = ec2.describe_vpcs(VpcIds=[plane.network.vpc_id])["Vpcs"][0]
    assert vpc["CidrBlock"] == "10.40.0.0/16" and c.owns(vpc["Tags"]) and plane.network.made
    subnets = ec2.describe_subnets(SubnetIds=list(plane.network.subnet_ids))["Subnets"]
    assert sorted(s["CidrBlock"] for s in subnets) == ["10.40.0.0/20", "10.40.16.0/20"]
    assert len({s["AvailabilityZone"] for s in subnets}) == 2 and all(s["MapPublicIpOnLaunch"] for s in subnets)
    gateway = ec2.describe_internet_gateways(Filters=c.filters())["InternetGateways"][0]
    assert gateway["Attachments"][0]["VpcId"] == plane.network.vpc_id
    main = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [plane.network.vpc_id]},
                                              {"Name": "association.main", "Values": ["true"]}])["RouteTables"][0]
    assert any(r.get("DestinationCidrBlock") == "0.0.0.0/0" and r.get("GatewayId") == gateway["InternetGatewayId"]
               for r in main["Routes"])

    # the seed's security groups, whose rules reference each other
    groups = plane.security_groups
    names = {g["GroupId"]: g["GroupName"] for g in ec2.describe_security_groups(Filters=c.filters())[
        "SecurityGroups"]}
    assert sorted(names.values()) == sorted(f"shop-production-{n}" for n in (
        "sg", "web-sg", "worker-sg", "cache-sg", "db-sg", "lb-sg", "fenced-sg"))
    # (the fenced group: a former primary rebuilt as a replica takes its base backup while fenced)
    assert ingress(groups["db"]) == {(5432, "shop-production-web-sg"), (5432, "shop-production-worker-sg"),
                                     (5432, "shop-production-db-sg"), (5432, "shop-production-fenced-sg")}
    assert ingress(groups["cache"]) == {(port, f"shop-production-{role}-sg") for port in (6379, 5672)
                                        for role in ("web", "worker")}
    assert ingress(groups["web"]) == {(443, "shop-production-lb-sg")}
    assert ingress(groups["lb"]) == {(443, "0.0.0.0/0"), (80, "0.0.0.0/0")}
    assert ingress(groups["common"]) == {(22, "198.51.100.0/24"), (22, "shop-production-worker-sg")}
    assert ingress(groups["fenced"]) == {(22, "198.51.100.0/24")}
    assert ingress(groups["worker"]) == set()

    # the seed's health check, short; a short deregistration delay
    target_group = elbv2.describe_target_groups(TargetGroupArns=[plane.target_group_arn])["TargetGroups"][0]
    assert (target_group["Protocol"], target_group["Port"], target_group["HealthCheckProtocol"],
            target_group["HealthCheckPath"], target_group["HealthCheckIntervalSeconds"],
            target_group["HealthyThresholdCount"], target_group["UnhealthyThresholdCount"]) == (
        "HTTPS", 443, "HTTPS", "/healthcheck.html", 5, 2, 2)
    attributes = {a["Key"]: a["Value"] for a in elbv2.describe_target_group_attributes(
        TargetGroupArn=plane.target_group_arn)["Attributes"]}
    assert attributes["deregistration_delay.timeout_seconds"] == "30"

    balancer = elbv2.describe_load_balancers(LoadBalancerArns=[plane.load_balancer_arn])["LoadBalancers"][0]
    assert balancer["Scheme"] == "internet-facing" and balancer["SecurityGroups"] == [groups["lb"]]
    listeners = {x["Port"]: x for x in elbv2.describe_listeners(LoadBalancerArn=plane.load_balancer_arn)[
        "Listeners"]}
    assert listeners[443]["Protocol"] == "HTTPS" and listeners[443]["SslPolicy"] == TLS_POLICY
    assert listeners[443]["Certificates"][0]["CertificateArn"] == plane.certificate_arn
    assert listeners[443]["DefaultActions"][0]["TargetGroupArn"] == plane.target_group_arn
    redirect = listeners[80]["DefaultActions"][0]
    assert redirect["Type"] == "redirect" and redirect["RedirectConfig"]["Protocol"] == "HTTPS"
    assert redirect["RedirectConfig"]["Port"] == "443" and redirect["RedirectConfig"]["StatusCode"] == "HTTP_301"
    # every response tells browsers to use HTTPS only, as the local provider's HAProxy does
    assert hsts(elbv2, listeners[443]["ListenerArn"]) == f"max-age={HSTS_MAX_AGE}"

    # the web group: the release's template, the target group, ELB health checks, requests per target
    assert plane.template is not None and plane.template.name == f"shop-production-web-{RELEASE}"
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["shop-production-web"])["AutoScalingGroups"][0]
    assert group["LaunchTemplate"]["LaunchTemplateId"] == plane.template.id
    assert group["TargetGroupARNs"] == [plane.target_group_arn] and group["HealthCheckType"] == "ELB"
    assert (group["MinSize"], group["DesiredCapacity"], group["MaxSize"]) == (2, 2, 8)
    assert len(group["Instances"]) == 2
    policy = asg.describe_policies(AutoScalingGroupName="shop-production-web")["ScalingPolicies"][0]
    tracking = policy["TargetTrackingConfiguration"]
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"] == "ALBRequestCountPerTarget"
    assert tracking["TargetValue"] == 6000   # 100 requests/s per server, AWS counts per minute
    assert web_group.group_template(c) == RELEASE

    ssm = boto3.client("ssm", region_name=REGION)
    stored = ssm.get_parameters_by_path(Path="/fabula/shop/production/", WithDecryption=False)["Parameters"]
    assert sorted(p["Name"] for p in stored) == ["/fabula/shop/production/db_password",
                                                 "/fabula/shop/production/django_secret_key"]
    assert {p["Type"] for p in stored} == {"SecureString"}
    assert parameters.read_secrets(c)["django_secret_key"] == SECRET


def test_a_second_ensure_makes_no_change(aws: None):
    c, pem, env = cloud(), certificate(), environment(image())
    ensure(c, env, pem)
    first = c.counter.total()
    c.counter.reset()
    again = ensure(c, env, pem)
    assert c.counter.changes() == {}, c.counter.changes()
    assert c.counter.total() < first / 2
    assert again.template is not None and again.template.release == RELEASE
    # and a third, from a fresh Cloud that knows nothing but the tags
    fresh = cloud()
    ensure(fresh, env, pem)
    assert fresh.counter.changes() == {}


def test_ensure_corrects_what_drifted(aws: None):
    c, pem, env = cloud(), certificate(), environment(image())
    plane = ensure(c, env, pem)
    ec2, elbv2 = boto3.client("ec2", region_name=REGION), boto3.client("elbv2", region_name=REGION)
    # an admin network taken out of fabula.yml, a health check changed by hand
    ec2.authorize_security_group_ingress(GroupId=plane.security_groups["common"], IpPermissions=[{
        "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "203.0.113.0/24"}]}])
    elbv2.modify_target_group(TargetGroupArn=plane.target_group_arn, HealthCheckPath="/")
    https = next(x["ListenerArn"] for x in elbv2.describe_listeners(LoadBalancerArn=plane.load_balancer_arn)[
        "Listeners"] if x["Port"] == 443)
    elbv2.modify_listener_attributes(ListenerArn=https, Attributes=[{"Key": HSTS_ATTRIBUTE, "Value": "max-age=60"}])
    c.counter.reset()
    ensure(c, env, pem)
    assert set(c.counter.changes()) == {"ec2.RevokeSecurityGroupIngress", "elbv2.ModifyTargetGroup",
                                        "elbv2.ModifyListenerAttributes"}
    assert hsts(elbv2, https) == f"max-age={HSTS_MAX_AGE}"
    assert (22, "203.0.113.0/24") not in ingress(plane.security_groups["common"])
    assert elbv2.describe_target_groups(TargetGroupArns=[plane.target_group_arn])["TargetGroups"][0][
        "HealthCheckPath"] == "/healthcheck.html"


def test_destroy_after_a_crash_removes_everything_tagged_and_again_changes_nothing(aws: None):
    c, pem, env = cloud(), certificate(), environment(image())
    assert env.aws is not None
    # a create cut off half way: network, groups, certificate, target group, a launch template,
    # an instance, a secret; no load balancer, no group
    network = ensure_network(c, env.aws.vpc)
    groups = ensure_security_groups(c, network, planned_permissions(ROLE_RULES, env.admin_sources, (443, 80)))
    ensure_certificate(c, *pem)
    ensure_target_group(c, network.vpc_id)
    template = web_group.ensure_launch_template(c, release=RELEASE, image=image(), instance_type="t3.small",
                                                security_group_ids=[groups["common"], groups["web"]])
    boto3.client("ec2", region_name=REGION).run_instances(
        LaunchTemplate={"LaunchTemplateId": template.id}, MinCount=1, MaxCount=1, SubnetId=network.subnet_ids[0])
    parameters.put_secrets(c, {"django_secret_key": SECRET})
    assert len(teardown.leftovers(c)) >= 10

    removed = teardown.destroy(c)
    assert any(line.startswith("vpc ") for line in removed) and any("instance" in line for line in removed)
    assert teardown.leftovers(c) == []
    c.counter.reset()
    assert teardown.destroy(c) == []
    assert c.counter.changes() == {}


def test_destroy_of_a_whole_environment_and_of_another_leaves_the_other(aws: None):
    pem, ami = certificate(), image()
    production, staging = cloud(env="production"), cloud(env="staging")
    ensure(production, environment(ami), pem)
    ensure(staging, environment(ami, vpc={"cidr": "10.41.0.0/16"}), pem)
    before = teardown.leftovers(staging)

    teardown.destroy(production)
    assert teardown.leftovers(production) == []
    assert teardown.leftovers(staging) == before
    staging.counter.reset()
    ensure(staging, environment(ami, vpc={"cidr": "10.41.0.0/16"}), pem)
    assert staging.counter.changes() == {}   # nothing of staging's was touched
    group = boto3.client("autoscaling", region_name=REGION).describe_auto_scaling_groups()["AutoScalingGroups"]
    assert [g["AutoScalingGroupName"] for g in group] == ["shop-staging-web"]


def test_names_that_collide_are_refused_not_shared(aws: None):
    # project a-b, env c and project a, env b-c share `fabula:env=a-b-c`; the project tag tells them apart
    first, second = cloud("a-b", "c"), cloud("a", "b-c")
    env = environment(image())
    assert env.aws is not None
    one = ensure_network(first, env.aws.vpc)
    two = ensure_network(second, env.aws.vpc)
    assert one.vpc_id != two.vpc_id
    ensure_target_group(first, one.vpc_id)
    with pytest.raises(AwsError) as caught:
        ensure_target_group(second, two.vpc_id)   # the name a-b-c-web is the other's
    assert "is not environment a-b-c's" in str(caught.value) and "fix:" in str(caught.value)
    teardown.destroy(second)
    assert teardown.leftovers(second) == [] and len(teardown.leftovers(first)) == 5  # vpc, 2 subnets, igw, tg


def test_an_adopted_vpc_is_used_and_never_removed(aws: None):
    ec2 = boto3.client("ec2", region_name=REGION)
    vpc_id = ec2.create_vpc(CidrBlock="10.50.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc_id, CidrBlock=f"10.50.{i}.0/24", AvailabilityZone=f"{REGION}{zone}")[
        "Subnet"]["SubnetId"] for i, zone in enumerate("ab")]
    c = cloud()
    env = environment(image(), vpc={"id": vpc_id, "subnets": subnets})
    plane = ensure(c, env, certificate())
    assert plane.network.vpc_id == vpc_id and not plane.network.made
    assert plane.network.cidr == "10.50.0.0/16"   # what pg_hba admits (the group's instances are anywhere in it)
    teardown.destroy(c)
    assert teardown.leftovers(c) == []
    assert ec2.describe_vpcs(VpcIds=[vpc_id])["Vpcs"] and len(ec2.describe_subnets(SubnetIds=subnets)["Subnets"]) == 2
    # subnets of another VPC, or of one zone, are refused naming the key
    other = ec2.create_vpc(CidrBlock="10.60.0.0/16")["Vpc"]["VpcId"]
    with pytest.raises(AwsError, match="aws.vpc.subnets"):
        ensure(c, environment(image(), vpc={"id": other, "subnets": subnets}), certificate())
    same_zone = ec2.create_subnet(VpcId=vpc_id, CidrBlock="10.50.9.0/24", AvailabilityZone=f"{REGION}a")["Subnet"]
    with pytest.raises(AwsError, match="two zones"):
        ensure(c, environment(image(), vpc={"id": vpc_id, "subnets": [subnets[0], same_zone["SubnetId"]]}),
               certificate())


def test_a_changed_certificate_is_reimported_in_place(aws: None):
    c = cloud()
    first, second = certificate(), certificate()
    arn = ensure_certificate(c, *first)
    c.counter.reset()
    assert ensure_certificate(c, *first) == arn and c.counter.changes() == {}
    assert ensure_certificate(c, *second) == arn
    assert c.counter.changes() == {"acm.ImportCertificate": 1}
    stored = boto3.client("acm", region_name=REGION).get_certificate(CertificateArn=arn)["Certificate"]
    assert x509.load_pem_x509_certificate(stored.encode()) == x509.load_pem_x509_certificate(second[0])


def test_the_group_follows_releases_and_its_size(aws: None):
    c, pem, ami = cloud(), certificate(), image()
    ensure(c, environment(ami), pem)
    plane = ensure(c, environment(ami), pem, release="fedcba987654")
    assert plane.template is not None and web_group.group_template(c) == RELEASE  # ensure never redeploys
    assert web_group.point_group(c, plane.template) and web_group.group_template(c) == "fedcba987654"
    assert not web_group.point_group(c, plane.template)
    web_group.set_desired(c, 3)
    group = boto3.client("autoscaling", region_name=REGION).describe_auto_scaling_groups()["AutoScalingGroups"][0]
    assert group["DesiredCapacity"] == 3
    ensure(c, environment(ami), pem)   # ensure keeps the desired count the group was given
    group = boto3.client("autoscaling", region_name=REGION).describe_auto_scaling_groups()["AutoScalingGroups"][0]
    assert group["DesiredCapacity"] == 3


def test_a_fixed_group_has_no_scaling_policy(aws: None):
    c, ami = cloud(), image()
    fixed = EnvironmentConfig.model_validate({
        "provider": "aws", "aws": {"region": REGION, "vpc": {"cidr": "10.40.0.0/24"}, "ami": ami,
                                   "state_bucket": "shop-state"},
        "admin_sources": ["198.51.100.0/24"], "servers": {"web": 2}})
    plane = ensure(c, fixed, certificate())
    assert plane.policy is None
    assert boto3.client("autoscaling", region_name=REGION).describe_policies()["ScalingPolicies"] == []


def test_the_state_bucket_lock_lets_one_writer_win(aws: None):
    now = [1000.0]
    mine, theirs = (StateBucket(cloud(), "shop-state", clock=lambda: now[0]) for _ in range(2))
    assert mine.ensure_bucket() and not theirs.ensure_bucket()
    assert mine.acquire({"who": "alice"}) is None
    assert theirs.acquire({"who": "bob"}) == {"who": "alice", "heartbeat": 1000.0}
    assert not theirs.release()        # bob holds nothing: alice's lock stays
    assert theirs.holder() == {"who": "alice", "heartbeat": 1000.0}
    now[0] += 300                      # alice's command died: no heartbeat for 300 s
    assert theirs.acquire({"who": "bob"}, stale_after=120) is None
    with pytest.raises(StateConflict):
        mine.heartbeat({"who": "alice"})   # taken over: alice learns it
    assert not mine.release()          # alice's late release leaves bob's lock (DeleteObject If-Match)
    assert theirs.holder() == {"who": "bob", "heartbeat": 1300.0}
    assert theirs.release() and theirs.holder() is None


def test_state_writes_are_conditional(aws: None):
    mine, theirs = StateBucket(cloud(), "shop-state"), StateBucket(cloud(), "shop-state")
    mine.ensure_bucket()
    etag = mine.write("state.json", b"{}", replacing=None)
    with pytest.raises(StateConflict):
        theirs.write("state.json", b"{\"x\": 1}", replacing=None)      # If-None-Match: it exists
    newer = theirs.write("state.json", b"{\"x\": 2}", replacing=etag)  # If-Match: the version read
    with pytest.raises(StateConflict):
        mine.write("state.json", b"{\"x\": 3}", replacing=etag)        # a lost update, refused
    stored = mine.read("state.json")
    assert stored is not None and stored.data == b"{\"x\": 2}" and stored.etag == newer
    # another environment's objects are apart
    assert StateBucket(cloud(env="staging"), "shop-state").read("state.json") is None


def test_aws_errors_name_the_call_and_the_fix(aws: None):
    c = cloud()
    env = environment(image(), vpc={"id": "vpc-0a1b2c3d", "subnets": ["subnet-0a1b2c3d", "subnet-1a2b3c4d"]})
    assert env.aws is not None
    with pytest.raises(AwsError) as caught:
        ensure_network(c, env.aws.vpc)
    message = str(caught.value)
    assert "AWS call ec2.DescribeSubnets failed (InvalidSubnetID.NotFound)" in message and "fix:" in message


def test_nothing_secret_is_printed_or_logged(aws: None, capsys: pytest.CaptureFixture[str],
                                            caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    c = cloud()
    ensure(c, environment(image()), certificate())
    parameters.put_secrets(c, {"django_secret_key": "changed-" + SECRET})
    # an AWS error whose text quotes the value sent (moto refuses no value: a stub stands in)
    with Stubber(c.ssm) as stub, pytest.raises(AwsError) as caught:
        stub.add_response("get_parameters_by_path", {"Parameters": []})
        stub.add_client_error("put_parameter", service_error_code="ValidationException",
                              service_message=f"Value '{SECRET}' failed to satisfy constraint")
        parameters.put_secrets(c, {"django_secret_key": SECRET})
    out = capsys.readouterr()
    text = out.out + out.err + caplog.text + str(caught.value) + repr(c.counter)
    assert SECRET not in text
    assert "ssm.PutParameter failed (ValidationException)" in str(caught.value)
