"""The aws provider against moto in-process, with FakeHosts where commands would run over SSH:
the fixed roles' instances made once whatever the number of creates, in their groups and zones;
the ALB and the Auto Scaling group as fabula's LoadBalancer and WebGroup; the S3 lock of the
team's store; fencing; destroy leaving nothing tagged; and the README's IAM policy, generated
from the calls a whole environment's life makes."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import botocore.session
import pytest

from fabula.config.schema import EnvironmentConfig
from fabula.errors import FabulaError, PrerequisiteError
from fabula.providers.aws import teardown
from fabula.providers.aws.instances import Instance, ssh_address
from fabula.providers.aws.policy import ON_CHANGE, iam_actions, policy_document
from fabula.providers.aws.provider import AwsProvider
from fabula.providers.base import Backend
from fabula.roles import ROLES, postgres
from fabula.state import EnvPaths, EnvState, ServerRecord
from fabula.testing import FakeAccess, FakeHost
from tests.unit.conftest import AWS_REGION

REGION = AWS_REGION
RELEASE = "0123456789ab"
README = Path(__file__).resolve().parents[2] / "README.md"
FIXED = {"worker1": "worker", "cache1": "cache", "db1": "db-primary", "db2": "db-replica"}
ROLE_RULES = {name: role.ingress(None) for name, role in ROLES.items()}  # type: ignore[arg-type]


def image() -> str:
    return str(boto3.client("ec2", region_name=REGION).describe_images(Owners=["amazon"])["Images"][0]["ImageId"])


def environment(tmp_path: Path, **ssh: Any) -> EnvironmentConfig:
    return EnvironmentConfig.model_validate({
        "provider": "aws",
        "aws": {"region": REGION, "vpc": {"cidr": "10.40.0.0/16"}, "ami": image(), "state_bucket": "shop-state"},
        "ssh": {"user": "admin", "known_hosts": str(tmp_path / "known_hosts"), **ssh},
        "admin_sources": ["198.51.100.0/24"],
        "servers": {"web": 2, "worker": 1, "cache": 1, "db-primary": 1, "db-replica": 1},
        "autoscaling": {"min": 2, "desired": 2, "max": 8, "metric": "requests", "target": 100},
    })


def provider(tmp_path: Path, env: EnvironmentConfig | None = None, access: FakeAccess | None = None,
             **kwargs: Any) -> AwsProvider:
    paths = EnvPaths(tmp_path / "state", "shop", "production")
    state = EnvState.load(paths) or EnvState(project="shop", env="production", provider="aws")
    if not state.servers:
        state.servers = {name: ServerRecord(name, role) for name, role in FIXED.items()}
    return AwsProvider(paths, env or environment(tmp_path), state, role_rules=ROLE_RULES,
                       session=boto3.Session(region_name=REGION), access=access or FakeAccess(),
                       sleep=lambda _: None, **kwargs)


def create_fixed(p: AwsProvider) -> dict[str, FakeHost]:
    p.ensure_network()
    hosts = {}
    for name, role in FIXED.items():
        host = p.ensure_server(name, role)
        p.prepare_host(host, ROLES[role].packages)
        assert isinstance(host, FakeHost)
        hosts[name] = host
    return hosts


def live(tag: str = "shop-production") -> list[dict[str, Any]]:
    ec2 = boto3.client("ec2", region_name=REGION)
    return [i for r in ec2.describe_instances(Filters=[
        {"Name": "tag:fabula:env", "Values": [tag]},
        {"Name": "instance-state-name", "Values": ["pending", "running"]}])["Reservations"] for i in r["Instances"]]


def test_create_twice_makes_one_instance_per_role(aws: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    first = provider(tmp_path)
    hosts = create_fixed(first)
    assert sorted(i["Tags"] and {t["Key"]: t["Value"] for t in i["Tags"]}["fabula:server"] for i in live()) == \
        sorted(FIXED)
    made = first.cloud.counter.changes()
    assert made["ec2.RunInstances"] == 4 and made["ec2.ImportKeyPair"] == 1
    # each record has its instance's private address; the environment's users and tree are there
    for name, host in hosts.items():
        assert first.state.servers[name].address == host.address and host.address.startswith("10.40.")
        assert any(c.argv[:2] == ["sh", "-c"] and "useradd" in c.argv[2] for c in host.calls)
        assert host.root == first.preparation.env_root / name

    second = provider(tmp_path)
    create_fixed(second)
    assert len(live()) == 4
    assert "ec2.RunInstances" not in second.cloud.counter.changes()
    assert second.cloud.counter.changes() == {}, second.cloud.counter.changes()
    # what create's last lines tell the user
    total, changed = first.cloud.counter.total(), sum(made.values())
    assert first.activity() == f"{total} AWS API calls: {changed} changed a resource, 0 wrote the shared state and lock"
    assert second.activity() == \
        f"{second.cloud.counter.total()} AWS API calls: none changed a resource, 0 wrote the shared state and lock"
    with capsys.disabled():
        print(f"\naws fixed instances: first create {first.cloud.counter.total()} API calls "
              f"({sum(made.values())} changes), second {second.cloud.counter.total()} (0 changes)")


def test_instances_are_in_their_groups_zones_and_volumes(aws: None, tmp_path: Path):
    p = provider(tmp_path)
    create_fixed(p)
    ec2 = boto3.client("ec2", region_name=REGION)
    groups = {g["GroupId"]: g["GroupName"] for g in ec2.describe_security_groups()["SecurityGroups"]}
    by_name = {{t["Key"]: t["Value"] for t in i["Tags"]}["fabula:server"]: i for i in live()}
    placed = {name: sorted(groups[g["GroupId"]] for g in i["SecurityGroups"]) for name, i in by_name.items()}
    assert placed == {"worker1": ["shop-production-sg", "shop-production-worker-sg"],
                      "cache1": ["shop-production-cache-sg", "shop-production-sg"],
                      "db1": ["shop-production-db-sg", "shop-production-sg"],
                      "db2": ["shop-production-db-sg", "shop-production-sg"]}
    zones = {name: i["Placement"]["AvailabilityZone"] for name, i in by_name.items()}
    assert zones["db1"] != zones["db2"]
    assert {i["KeyName"] for i in by_name.values()} == {"shop-production-key"}
    assert {i["InstanceType"] for n, i in by_name.items() if n.startswith("db")} == {"m6i.large"}
    assert {i["MetadataOptions"]["HttpTokens"] for i in by_name.values()} == {"required"}
    volumes = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id",
                                             "Values": [i["InstanceId"] for i in by_name.values()]}])["Volumes"]
    assert len(volumes) == 4 and all(v["Encrypted"] and v["VolumeType"] == "gp3" for v in volumes)
    # the key pair is the environment's generated key, kept 0600 beside its secrets
    key = p.paths.secrets_dir / "ssh_ed25519"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (key.parent / "ssh_ed25519.pub").read_text().startswith("ssh-ed25519 ")


def test_a_web_role_is_not_an_instance_fabula_makes(aws: None, tmp_path: Path):
    p = provider(tmp_path)
    p.ensure_network()
    with pytest.raises(FabulaError, match="Auto Scaling group"):
        p.ensure_server("web1", "web")


def test_the_databases_admit_the_app_servers_from_anywhere_in_the_vpc(aws: None, tmp_path: Path):
    """The group's instances get addresses of AWS's choosing: pg_hba admits the VPC's range (the
    security groups admit only web and worker), recorded in the state like a local subnet."""
    p = provider(tmp_path)
    p.ensure_network()
    assert p.state.subnet == "10.40.0.0/16"
    assert EnvState.load(p.paths).subnet == "10.40.0.0/16"   # type: ignore[union-attr]
    assert postgres.client_networks(SimpleNamespace(state=p.state), ("web", "worker")) == ["10.40.0.0/16"]


def test_the_address_fabula_connects_to(aws: None, tmp_path: Path):
    instance = Instance("i-1", "db1", "db-primary", "running", "10.40.0.5", "203.0.113.9", "subnet-1", "a", ())
    assert ssh_address(instance, None) == "203.0.113.9"
    assert ssh_address(instance, "bastion.example.com") == "10.40.0.5"
    assert ssh_address(Instance("i-2", "w", "worker", "running", "10.40.0.6", None, "s", "a", ()), None) == "10.40.0.6"
    access = FakeAccess()
    p = provider(tmp_path, environment(tmp_path, jump="bastion.example.com"), access)
    create_fixed(p)
    # through the jump host, the private address: the one the e2e harness gives a namespace
    assert access.ssh_addresses["db1"] == p.state.servers["db1"].address
    # the host keys fabula learned at creation, and only those, are recorded and removed with the instance
    known = (tmp_path / "known_hosts").read_text()
    assert all(p.state.servers[n].address in known for n in FIXED)
    p.remove_server("db2")
    assert p.state.servers["db2"].address not in (tmp_path / "known_hosts").read_text()
    overridden = provider(tmp_path, access=FakeAccess(), address=lambda i, jump: "192.0.2.1")
    overridden.host("db1")
    assert overridden.access.ssh_addresses["db1"] == "192.0.2.1"   # type: ignore[attr-defined]


def test_the_load_balancer_and_the_web_group(aws: None, tmp_path: Path):
    p = provider(tmp_path)
    p.state.release = RELEASE   # a release exists: its launch template and the group are made
    create_fixed(p)
    group = p.web_group(None)
    assert group.desired() == 2 and len(group.members()) == 2 and group.release() == RELEASE
    changed = group.set_desired(3)
    assert changed["from"] == 2 and changed["to"] == 3 and len(changed["launched"]) == 1
    members = group.members()
    assert len(members) == 3
    assert set(group.health()) == set(members) and set(group.health().values()) == {"UP"}
    lb = p.load_balancer
    assert lb.is_running() and re.fullmatch(r"https://[^/:]+\.elb\.amazonaws\.com/", lb.url())
    # the fixed worker registered by name (its inventory record), by instance id for the group's
    lb.ensure([Backend("worker1", p.state.servers["worker1"].address, 443)])
    assert lb.health() == {"worker1": "UP"}
    lb.ensure([Backend(m, "", 443) for m in members])
    assert lb.health() == {m: "UP" for m in members}
    assert lb.stats()[members[0]] == {"scur": "0", "req_rate": "0", "status": "UP"}
    lb.drain(members[0])
    assert members[0] not in lb.health() and lb.active_requests(members[0]) == 0   # moto: no draining state
    lb.ready(members[0])
    assert lb.health()[members[0]] == "UP"


def test_the_shared_store_admits_one_holder(aws: None, tmp_path: Path):
    alice, bob = provider(tmp_path / "a").shared_store(), provider(tmp_path / "b").shared_store()
    assert alice.acquire({"owner": "alice", "pid": 1}) is None
    assert bob.acquire({"owner": "bob", "pid": 2}) == {"owner": "alice", "pid": 1}
    assert bob.holder() == {"owner": "alice", "pid": 1}
    # the files go with the lock: what alice pushes, bob pulls
    mine = tmp_path / "a" / "state.json"
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_text('{"release": "x"}')
    alice.push({"state.json": mine})
    alice.release()
    assert bob.holder() is None and bob.acquire({"owner": "bob", "pid": 2}) is None
    theirs = tmp_path / "b" / "state.json"
    theirs.parent.mkdir(parents=True, exist_ok=True)
    bob.pull({"state.json": theirs, "pki": tmp_path / "b" / "pki"})
    assert json.loads(theirs.read_text()) == {"release": "x"} and not (tmp_path / "b" / "pki").exists()
    bob.release()


def test_firewall_is_the_groups_and_fencing_swaps_them(aws: None, tmp_path: Path):
    p = provider(tmp_path)
    hosts = create_fixed(p)
    # made in its groups; on the instance, its metadata (the role's credentials) is root's only
    assert p.apply_firewall(hosts["db1"], []) is True
    guard = hosts["db1"].path("etc", "firewall.confirmed")   # (loaded at boot by the server's unit)
    assert "ip daddr 169.254.169.254 meta skuid != 0 reject" in hosts["db1"].text(guard)
    assert hosts["db1"].ran("nft", "-f", str(guard))
    assert p.apply_firewall(hosts["db1"], []) is False
    p.state.servers["db1"].rebuild = True
    assert p.apply_firewall(hosts["db1"], []) is True
    assert p.apply_firewall(hosts["db1"], []) is False
    ec2 = boto3.client("ec2", region_name=REGION)
    fenced = ec2.describe_security_groups(GroupNames=["shop-production-fenced-sg"])["SecurityGroups"][0]["GroupId"]
    db1 = p.host("db1")
    assert db1.name == "db1"
    instance = [i for i in live() if {t["Key"]: t["Value"] for t in i["Tags"]}["fabula:server"] == "db1"][0]
    assert [g["GroupId"] for g in instance["SecurityGroups"]] == [fenced]
    p.state.servers["db1"].rebuild = False
    assert p.apply_firewall(hosts["db1"], []) is True   # rebuilt: back in the database groups


def test_destroy_leaves_nothing_tagged(aws: None, tmp_path: Path):
    p = provider(tmp_path)
    p.state.release = RELEASE
    create_fixed(p)
    p.shared_store().push({"state.json": p.paths.state_file})
    assert "role shop-production-controller" in teardown.leftovers(p.cloud)   # the worker's instance role
    removed = p.destroy()
    assert any(r.startswith("key pair") for r in removed) and any(r.startswith("known_hosts entry") for r in removed)
    assert "role shop-production-controller" in removed
    assert teardown.leftovers(p.cloud) == [] and live() == [] and p.list_servers() == []
    assert (tmp_path / "known_hosts").read_text() == ""
    assert provider(tmp_path).destroy() == []   # again: nothing left to remove


def test_no_credentials_is_a_prerequisite_error_before_any_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    env = EnvironmentConfig.model_validate({
        "provider": "aws", "admin_sources": ["198.51.100.0/24"],
        "aws": {"region": REGION, "vpc": {"cidr": "10.40.0.0/16"}, "ami": "ami-12345678", "state_bucket": "b-1"}})
    session = boto3.Session(botocore_session=botocore.session.Session(), region_name=REGION)
    p = AwsProvider(EnvPaths(tmp_path, "shop", "production"), env, EnvState("shop", "production", "aws"),
                    role_rules=ROLE_RULES, session=session, access=FakeAccess())
    with pytest.raises(PrerequisiteError, match="no AWS credentials") as raised:
        p.check_prerequisites()
    assert "AWS_PROFILE" in str(raised.value.hint)
    assert p.cloud.counter.total() == 0


def lifecycle(tmp_path: Path) -> list[str]:
    """An environment's whole life, for the calls it makes: create (twice), the web group and
    load balancer, the shared store, fencing, a removed server, destroy."""
    p = provider(tmp_path)
    again = provider(tmp_path)
    p.check_prerequisites()
    store = p.shared_store()
    store.acquire({"owner": "alice"})
    store.pull({"state.json": p.paths.state_file})
    p.state.release = RELEASE
    create_fixed(p)
    again.state.release = RELEASE
    create_fixed(again)
    group = p.web_group(None)
    group.set_desired(3)
    p.load_balancer.ensure([Backend(m, "", 443) for m in group.members()])
    p.load_balancer.drain(group.members()[0])
    p.load_balancer.ready(group.members()[0])
    group.suspend(["scaling", "healing"], True)
    group.suspend(["scaling", "healing"], False)
    group.terminate(group.members()[0])   # a deploy's retired instance: the desired count decremented
    p.load_balancer.stats()
    p.load_balancer.url()
    p.state.servers["db1"].rebuild = True
    p.apply_firewall(p.host("db1"), [])
    p.remove_server("db2")
    store.holder()
    store.push({"state.json": p.paths.state_file})
    store.release()
    p.destroy()
    return sorted({*p.cloud.counter.calls, *again.cloud.counter.calls})


def test_the_readme_policy_is_the_calls_fabula_makes(aws: None, tmp_path: Path):
    actions = iam_actions(lifecycle(tmp_path))
    text = README.read_text()
    section = text[text.index("## On AWS"):]
    found = re.search(r"```json\n(.*?)\n```", section, re.S)
    assert found is not None, "README's On AWS section has no ```json policy"
    assert found.group(1) == policy_document(actions), "update README's policy:\n" + policy_document(actions)


def test_the_policys_calls_on_change_are_calls_the_code_makes():
    source = "".join(path.read_text() for path in (README.parent / "src" / "fabula" / "providers" / "aws").glob("*.py"))
    for call in ON_CHANGE:
        service, operation = call.split(".")
        method = re.sub(r"(?<!^)(?=[A-Z])", "_", operation).lower()
        assert f".{method}(" in source, f"{call} is in the policy, but no code of the aws provider calls it"


def test_create_is_no_longer_refused(aws: None, tmp_path: Path):
    # the web tier is built (deploy/native.py, tests/unit/test_aws_web_tier.py): nothing to refuse,
    # and asking makes no call
    p = provider(tmp_path)
    p.check_can_create("fabula.yml")
    assert live() == [] and p.cloud.counter.total() == 0
