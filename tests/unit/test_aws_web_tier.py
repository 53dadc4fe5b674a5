"""The web tier on the Auto Scaling group (deploy/native.py through the aws provider), against
moto in-process with FakeHosts where commands would run over SSH: create's web tier brings the
group to its desired count, every instance converged by the web role and registered only once
converged; a serial deploy replaces every instance by one of the new release's template (each
old one deregistered before it is terminated, the desired count back to what it was); a rollback
points the group at the previous template; `fabula scale` sets the desired count and converges
what the group launched; suspend and resume reach the group's processes."""
from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import boto3
import pytest
from rich.console import Console

from fabula.autoscaling.actions import set_suspended
from fabula.autoscaling.group import set_desired
from fabula.config import load_config
from fabula.context import Context, Release
from fabula.deploy import native
from fabula.deploy.group import wait_healthy
from fabula.output import Output
from fabula.pki import CertificateAuthority
from fabula.providers.aws.provider import AwsProvider
from fabula.providers.base import Backend, Host, Result
from fabula.release import METADATA
from fabula.roles import ROLES
from fabula.roles.web import HTTPS_PORT
from fabula.state import EnvPaths, EnvState
from fabula.testing import FakeAccess, FakeHost
from fabula.topology import plan_servers
from tests.unit.test_aws_provider import REGION, ROLE_RULES, image
from tests.unit.test_roles import SECRETS

FIRST, SECOND = "0123456789ab", "fedcba987654"


class Calls:
    """Every AWS call in order, with the instances it names (botocore's before-parameter-build)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, list[str]]] = []

    def record(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        ids = [t["Id"] for t in params.get("Targets", [])] + ([params["InstanceId"]] if "InstanceId" in params else [])
        self.log.append((model.name, ids))

    def index(self, operation: str, instance_id: str) -> int:
        return next(i for i, (name, ids) in enumerate(self.log) if name == operation and instance_id in ids)


class WatchedAccess(FakeAccess):
    """FakeAccess whose web hosts note, at each call to their supervisord (the role's programs
    applied, started), whether the target group held them then."""

    def __init__(self) -> None:
        super().__init__()
        self.provider: AwsProvider | None = None
        self.registered_while_converging: dict[str, list[bool]] = {}

    def host(self, name: str, role: str, ssh_address: str, address: str, root: PurePosixPath,
             accounts: Any) -> Host:
        host = super().host(name, role, ssh_address, address, root, accounts)
        assert isinstance(host, FakeHost)
        if role == "web" and not host.answers:
            def watch(argv: list[str], host: FakeHost = host) -> Result:
                assert self.provider is not None
                if "--unix-socket" in argv:  # Supervisor.rpc
                    targets = self.provider.load_balancer.health()
                    self.registered_while_converging.setdefault(host.name, []).append(host.name in targets)
                return host._builtin(argv)
            host.answer(["curl"], watch)
        return host


@pytest.fixture
def setup(aws: None, tmp_path: Path) -> Iterator[tuple[Context, AwsProvider, WatchedAccess, Calls]]:  # noqa: F811
    app = tmp_path / "app"
    app.mkdir()
    (app / "fabula.yml").write_text(f"""project: shop
app: {{wsgi: shop.wsgi:application, settings: shop.settings, celery: shop.celery:app}}
environments:
  production:
    provider: aws
    aws: {{region: {REGION}, vpc: {{cidr: 10.40.0.0/16}}, ami: {image()}, state_bucket: shop-state}}
    ssh: {{user: admin, known_hosts: {tmp_path / "known_hosts"}}}
    admin_sources: [198.51.100.0/24]
    servers: {{web: 2, worker: 1, cache: 1, db-primary: 1, db-replica: 1}}
    autoscaling: {{min: 1, desired: 2, max: 4, metric: requests, target: 100}}
""")
    config = load_config(app / "fabula.yml")
    env = config.environment("production")
    paths = EnvPaths(tmp_path / "state", "shop", "production")
    paths.make_env_dir()
    for release_id in (FIRST, SECOND):  # built releases, as `release.load` finds them
        (paths.releases_dir / release_id).mkdir(parents=True)
        (paths.releases_dir / release_id / METADATA).write_text(json.dumps({"id": release_id, "commit": release_id}))
    state = EnvState(project="shop", env="production", provider="aws")
    session = boto3.Session(region_name=REGION)
    calls = Calls()
    session.events.register("before-parameter-build", calls.record)
    access = WatchedAccess()
    provider = AwsProvider(paths, env, state, role_rules=ROLE_RULES, session=session, access=access,
                           sleep=lambda _: None)
    access.provider = provider
    state.servers = plan_servers(env, state, native_web_group=True)
    out = Output(quiet=True, console=Console(file=io.StringIO()), err_console=Console(file=io.StringIO(), width=400))
    ctx = Context(config=config, env_name="production", env=env, paths=paths, state=state, out=out,
                  provider=provider, secrets=SECRETS, ca=CertificateAuthority(paths),
                  release=Release(FIRST, FIRST, str(paths.releases_dir / FIRST)))
    provider.ensure_network()
    for record in state.servers.values():
        ctx.hosts[record.name] = provider.ensure_server(record.name, record.role)
    yield ctx, provider, access, calls


class Op:
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield


def create_web_tier(ctx: Context) -> list[str]:
    """What `create` does for a native group (operations/create.py), after the release is built."""
    group = ctx.provider.web_group(ctx)
    assert group is not None
    webs = native.bring_up(ctx, group, ctx.require_release())
    for host in webs:
        ROLES["web"].converge(ctx, host)
    ctx.provider.load_balancer.ensure([Backend(h.name, h.address, HTTPS_PORT) for h in webs])
    wait_healthy(ctx, [h.name for h in webs])
    for host in webs:
        ctx.state.servers[host.name].release = FIRST
    ctx.state.release = FIRST
    return [h.name for h in webs]


def converged(host: FakeHost) -> bool:
    """The web role ran on the host: nginx's configuration and gunicorn's program are there."""
    return host.path("etc", "nginx", "nginx.conf") in host.files and "gunicorn" in host.programs()


def template_of_group(provider: AwsProvider) -> str:
    group = provider.cloud.autoscaling.describe_auto_scaling_groups()["AutoScalingGroups"][0]
    return str(group["LaunchTemplate"]["LaunchTemplateName"])


def test_the_plan_has_no_web_servers_for_a_native_group(setup):
    ctx, provider, _, _ = setup
    assert ctx.state.by_role("web") == [] and len(ctx.state.servers) == 4


def test_create_brings_the_group_to_its_desired_count_converged_and_registered(setup):
    ctx, provider, access, _ = setup
    names = create_web_tier(ctx)
    group = provider.web_group(ctx)
    assert group.desired() == 2 and sorted(names) == group.members() and len(names) == 2
    assert sorted(r.name for r in ctx.state.by_role("web")) == sorted(names)
    for name in names:
        host = access.hosts[name]
        assert converged(host), name
        assert ctx.state.servers[name].address == host.address
        # out of the target group while converged, in it once converged
        assert access.registered_while_converging[name] and not any(access.registered_while_converging[name])
    assert provider.load_balancer.health() == {n: "UP" for n in names}
    assert group.release() == FIRST and template_of_group(provider) == f"shop-production-web-{FIRST}"
    # describe: the group in AWS's words, each instance in service, healthy in the target group
    report = group.report()
    assert (report["exists"], report["desired"], report["min"], report["max"], report["release"]) == \
        (True, 2, 1, 4, FIRST)
    assert [(i["name"], i["lifecycle"], i["target"], i["release"]) for i in report["instances"]] == \
        [(n, "InService", "healthy", FIRST) for n in sorted(names)]
    assert report["scaling"] and "ALBRequestCountPerTarget" in report["scaling"]
    # a second create's web tier launches nothing and keeps the members in service
    before = set(group.members())
    assert create_web_tier(ctx) and set(group.members()) == before
    assert provider.load_balancer.health() == {n: "UP" for n in names}


def serial(ctx: Context, release_id: str) -> list[str]:
    group = ctx.provider.web_group(ctx)
    assert group is not None
    old = [r.name for r in ctx.state.by_role("web")]
    migrated: list[str] = []
    new = Release(release_id, release_id, str(ctx.paths.releases_dir / release_id))
    native.serial(ctx, Op(), group, new, old, lambda c, n, o, record: migrated.append(n.id))
    assert migrated == [release_id]   # once, after the first new server was converged
    ctx.state.previous_release, ctx.state.release = ctx.state.release, release_id
    return old


def test_a_serial_deploy_replaces_every_instance_draining_each_before_it_goes(setup):
    ctx, provider, access, calls = setup
    create_web_tier(ctx)
    group = provider.web_group(ctx)
    old = serial(ctx, SECOND)
    members = group.members()
    assert group.desired() == 2 and len(members) == 2 and not set(members) & set(old)
    assert template_of_group(provider) == f"shop-production-web-{SECOND}" and group.release() == SECOND
    # every instance left is of the new release's template, converged, in service, recorded
    assert {m.release for m in group.wait_members(2, 0)} == {SECOND}
    assert sorted(r.name for r in ctx.state.by_role("web")) == members
    assert {ctx.state.servers[m].release for m in members} == {SECOND}
    assert provider.load_balancer.health() == {m: "UP" for m in members}
    for name in members:
        assert converged(access.hosts[name]) and not any(access.registered_while_converging[name])
    # each old instance: deregistered (drained), then terminated with the desired count decremented
    for name in old:
        assert calls.index("DeregisterTargets", name) < calls.index("TerminateInstanceInAutoScalingGroup", name)
    assert [op for op, _ in calls.log].count("TerminateInstanceInAutoScalingGroup") == 2


def test_a_rollback_points_the_group_at_the_previous_template(setup):
    ctx, provider, _, _ = setup
    create_web_tier(ctx)
    serial(ctx, SECOND)
    assert template_of_group(provider) == f"shop-production-web-{SECOND}"
    templates = provider.cloud.ec2.describe_launch_templates()["LaunchTemplates"]
    serial(ctx, FIRST)   # the rollback: a serial deploy of the previous release (deploy/rollout.py)
    group = provider.web_group(ctx)
    assert template_of_group(provider) == f"shop-production-web-{FIRST}" and group.release() == FIRST
    assert {m.release for m in group.wait_members(2, 0)} == {FIRST} and group.desired() == 2
    # the previous release's template itself, not a new one
    assert provider.cloud.ec2.describe_launch_templates()["LaunchTemplates"] == templates


def test_scale_sets_the_desired_count_and_converges_what_the_group_launched(setup):
    ctx, provider, access, _ = setup
    ctx.state.release = FIRST
    create_web_tier(ctx)
    before = set(provider.web_group(ctx).members())
    result = set_desired(ctx, 3)
    group = provider.web_group(ctx)
    assert group.desired() == 3 and result["from"] == 2 and result["to"] == 3
    (added,) = set(group.members()) - before
    assert result["launched"] == [added]
    assert converged(access.hosts[added]) and not any(access.registered_while_converging[added])
    assert provider.load_balancer.health()[added] == "UP" and ctx.state.servers[added].release == FIRST
    set_desired(ctx, 2)
    assert group.desired() == 2 and sorted(r.name for r in ctx.state.by_role("web")) == group.members()


def test_suspend_and_resume_reach_the_groups_processes(setup):
    ctx, provider, _, _ = setup
    ctx.state.release = FIRST
    ctx.state.save(ctx.paths)
    create_web_tier(ctx)

    def suspended() -> list[str]:
        group = provider.cloud.autoscaling.describe_auto_scaling_groups()["AutoScalingGroups"][0]
        return sorted(p["ProcessName"] for p in group.get("SuspendedProcesses", []))

    assert set_suspended(ctx, True, ["scaling"]) == ["scaling"]
    assert suspended() == ["AlarmNotification"]
    set_suspended(ctx, True, None)
    assert suspended() == ["AlarmNotification", "Launch", "ReplaceUnhealthy", "Terminate"]
    set_suspended(ctx, False, ["healing"])
    assert suspended() == ["AlarmNotification"]
    set_suspended(ctx, False, None)
    assert suspended() == []


def test_a_provider_with_a_native_group_may_create(setup):
    ctx, provider, _, _ = setup
    provider.check_can_create("fabula.yml")   # no refusal any more: the web tier is built


def test_the_workers_program_converges_what_the_group_launched_by_itself_within_its_roles_calls(setup):
    """fabula's program on the worker (autoscaling/controller.py's keep): the group's own
    scale-out and a member it terminated; every AWS call it makes is one its instance role allows."""
    from fabula.autoscaling.controller import Controller
    from fabula.providers.aws import controller_role
    from fabula.providers.aws.policy import iam_actions

    ctx, provider, access, _ = setup
    ctx.state.release = FIRST
    first = create_web_tier(ctx)
    name = provider.web_group(ctx).members()[0]
    autoscaling = provider.cloud.autoscaling
    group_name = autoscaling.describe_auto_scaling_groups()["AutoScalingGroups"][0]["AutoScalingGroupName"]
    # as the group's policy and its health check would: not through fabula
    autoscaling.set_desired_capacity(AutoScalingGroupName=group_name, DesiredCapacity=3)
    autoscaling.terminate_instance_in_auto_scaling_group(InstanceId=name, ShouldDecrementDesiredCapacity=True)
    store = provider.shared_store()   # (create made the state bucket)
    store.acquire({"owner": "alice"})
    store.release()
    # the program's own view of the environment: from inside the VPC, nothing of this command's
    on_worker = AwsProvider(ctx.paths, ctx.env, ctx.state, role_rules=ROLE_RULES, session=provider.cloud.session,
                            access=access, sleep=lambda _: None, controller_home=ctx.paths.root / "controller")
    access.provider = on_worker
    ctx = dataclasses.replace(ctx, provider=on_worker, hosts={})
    provider = on_worker
    group = provider.web_group(ctx)
    (launched,) = set(group.members()) - set(first)
    keeper = Controller(ctx.config.path, ctx.env_name, out=ctx.out)
    keeper.keep(ctx, group)
    assert sorted(r.name for r in ctx.state.by_role("web")) == sorted(group.members())
    assert name not in ctx.state.servers and ctx.state.servers[launched].release == FIRST
    assert converged(access.hosts[launched]) and not any(access.registered_while_converging[launched])
    assert provider.load_balancer.health() == {m: "UP" for m in group.members()}
    made = iam_actions(provider.cloud.counter.calls, with_implied=False)
    allowed = {a for s in controller_role.policy(provider.cloud, "shop-state")["Statement"] for a in s["Action"]}
    assert set(made) == allowed - {"ec2:ModifyInstanceAttribute"}, \
        f"CONTROLLER_CALLS should be: {sorted(provider.cloud.counter.calls)}"
    # its role and profile, made by ensure_network, with that policy
    iam = provider.cloud.iam
    role = controller_role.name(provider.cloud)
    document = iam.get_role_policy(RoleName=role, PolicyName=controller_role.POLICY)["PolicyDocument"]
    document = json.loads(document) if isinstance(document, str) else document
    assert document == controller_role.policy(provider.cloud, "shop-state")
    worker = provider.cloud.ec2.describe_iam_instance_profile_associations()["IamInstanceProfileAssociations"]
    assert [a["IamInstanceProfile"]["Arn"].rsplit("/", 1)[-1] for a in worker] == [role]
    keeper.keep(ctx, group)   # nothing new: nothing done
    assert sorted(r.name for r in ctx.state.by_role("web")) == sorted(group.members())
    provider.cloud.counter.reset()
    keeper.keep(ctx, group)   # the group as the state had it last: the shared files are not read again
    assert sorted(provider.cloud.counter.calls) == ["autoscaling.DescribeAutoScalingGroups", "ec2.DescribeInstances"]
