"""The web group behind the WebGroup interface: fabula's own group (ManagedWebGroup) reads the
state and the load balancer and scales through the autoscaler's actions; a provider's own group
takes its place; `fabula scale` goes through whichever it is; a launch that fails leaves no
server behind."""
from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from fabula.autoscaling.group import ManagedWebGroup, web_group
from fabula.autoscaling.log import decisions_path, read_decisions
from fabula.cli import scaling
from fabula.config import load_config
from fabula.context import Context, Release
from fabula.deploy import group, rollout
from fabula.deploy.group import launch_or_remove, launch_or_remove_many
from fabula.deploy.native import keep
from fabula.errors import FabulaError
from fabula.output import Output
from fabula.pki import CertificateAuthority
from fabula.providers.base import Backend, Member, NativeWebGroup, WebGroup
from fabula.state import EnvPaths, EnvState
from fabula.testing import FakeProvider
from fabula.topology import plan_servers
from tests.unit.test_roles import SECRETS


class NativeGroup(NativeWebGroup):
    """A platform's own group (as an Auto Scaling group would be): records what it is asked; its
    running members are web1..web3 (i-0abc, just launched, is not running yet)."""

    def __init__(self):
        self.asked: list[int] = []

    def launch_from(self, release: str) -> bool:
        return False

    def wait_members(self, count: int, timeout: float) -> list[Member]:
        return self.in_service()

    def in_service(self) -> list[Member]:
        return [Member(f"web{n}", f"10.0.0.{10 + n}", "abcdef012345") for n in (1, 2, 3)]

    def terminate(self, name: str) -> None:
        raise AssertionError("nothing is terminated here")

    def suspend(self, processes: list[str], suspend: bool) -> None:
        self.asked.append(-1)

    def desired(self) -> int:
        return 7

    def set_desired(self, count: int) -> dict:
        self.asked.append(count)
        return {"from": 7, "to": count, "launched": ["i-0abc"]}

    def members(self) -> list[str]:
        return ["i-0abc"]

    def health(self) -> dict[str, str]:
        return {"i-0abc": "healthy"}

    def release(self) -> str | None:
        return "native"

    def report(self) -> dict:
        return {"name": "native", "exists": True}


class NativeProvider(FakeProvider):
    def __init__(self, group: WebGroup, **kw):
        super().__init__(**kw)
        self.group = group

    def web_group(self, ctx) -> WebGroup | None:
        return self.group


@pytest.fixture
def ctx(tmp_path) -> Context:
    app = tmp_path / "app"
    app.mkdir()
    (app / "fabula.yml").write_text("""project: polls
app: {wsgi: polls.wsgi:application, settings: polls.settings, celery: polls.celery:app}
environments:
  testing:
    servers: {web: 3, worker: 1, cache: 1, db-primary: 1}
    autoscaling: {min: 1, desired: 3, max: 4}
""")
    config = load_config(app / "fabula.yml")
    env = config.environment("testing")
    paths = EnvPaths(tmp_path / "state", "polls", "testing")
    paths.env_dir.mkdir(parents=True)
    state = EnvState(project="polls", env="testing", subnet="10.0.0.0/24")
    state.servers = plan_servers(env, state)
    state.release = "abcdef012345"
    for record in state.by_role("web"):
        record.release = state.release
    provider = FakeProvider(state=state)
    for record in state.servers.values():
        provider.ensure_server(record.name, record.role)
    release = Release("abcdef012345", "abcdef0123456789", str(tmp_path / "releases" / "abcdef012345"))
    out = Output(quiet=True, console=Console(file=io.StringIO()), err_console=Console(file=io.StringIO(), width=400))
    return Context(config=config, env_name="testing", env=env, paths=paths, state=state, out=out,
                   provider=provider, secrets=SECRETS, ca=CertificateAuthority(paths), release=release)


def in_service(ctx: Context, *names: str) -> None:
    ctx.provider.load_balancer.ensure([Backend(n, ctx.state.servers[n].address, 443) for n in names])


def test_managed_group_members_are_the_web_servers_and_release_is_the_launch_configuration(ctx):
    group = web_group(ctx)
    assert isinstance(group, ManagedWebGroup)
    assert group.members() == ["web1", "web2", "web3"]
    assert group.release() == "abcdef012345"
    ctx.state.release = "0123456789ab"  # a deploy changed the launch configuration
    assert group.release() == "0123456789ab"
    ctx.state.web_desired = 2
    assert group.desired() == 2


def test_managed_group_health_is_the_load_balancers_for_its_members_only(ctx):
    in_service(ctx, "web1", "web2", "worker1")  # worker1: a backend that is no member
    ctx.provider.load_balancer.drain("web2")
    # web3 is not in the load balancer (not yet in service): left out rather than called healthy
    assert web_group(ctx).health() == {"web1": "UP", "web2": "DRAIN"}


def test_managed_group_set_desired_retires_and_says_what_changed(ctx):
    in_service(ctx, "web1", "web2", "web3")
    done = web_group(ctx).set_desired(2)
    assert done == {"from": 3, "to": 2, "launched": [], "retired": ["web3"]}  # the newest leaves
    assert web_group(ctx).members() == ["web1", "web2"]
    assert "web3" not in ctx.provider.hosts and ctx.state.web_desired == 2
    assert [(d["action"], d["outcome"]) for d in read_decisions(decisions_path(ctx.paths))] == [("scale", "ok")]


def test_a_providers_own_group_is_used_instead_of_fabulas(ctx):
    native = NativeGroup()
    ctx.provider = NativeProvider(native, state=ctx.state)
    assert web_group(ctx) is native


def test_fabula_scale_goes_through_the_providers_own_group(ctx, monkeypatch):
    native = NativeGroup()
    ctx.provider = NativeProvider(native, state=ctx.state)
    release_dir = ctx.paths.releases_dir / "abcdef012345"   # the launch configuration, built
    release_dir.mkdir(parents=True)
    (release_dir / "release.json").write_text('{"commit": "abcdef0123456789"}')
    monkeypatch.setattr(scaling, "open_env", lambda cli, config, env: ctx)
    app = typer.Typer()
    scaling.register(app)
    result = CliRunner().invoke(app, ["scale", "testing", "--desired", "4"])
    assert result.exit_code == 0, result.output
    assert native.asked == [4]
    assert ctx.state.web_desired is None and len(ctx.state.by_role("web")) == 3  # fabula's own group: untouched
    assert ctx.out.console.file.getvalue() == "web group of testing: desired 7 -> 4; launched i-0abc\n"


def broken(record):
    raise RuntimeError("the new code does not start")


def test_a_launch_that_fails_removes_its_server(ctx):
    with pytest.raises(RuntimeError, match="does not start"):
        launch_or_remove(ctx, ctx.require_release(), in_service=False, then=broken)
    assert web_group(ctx).members() == ["web1", "web2", "web3"]
    assert "web4" not in ctx.provider.hosts


def test_a_failed_removal_after_a_failed_launch_only_warns(ctx, monkeypatch):
    def stuck(name, drained=False):
        raise OSError(f"{name} is stuck")

    monkeypatch.setattr(ctx.provider, "remove_server", stuck)
    with pytest.raises(RuntimeError, match="does not start"):  # the launch's error, not the removal's
        launch_or_remove(ctx, ctx.require_release(), in_service=False, then=broken)
    assert "could not remove the failed web server web4: web4 is stuck" in ctx.out.err.file.getvalue()


class Phases:
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield


def test_a_serial_deploy_brings_all_new_servers_into_service_before_draining_the_old_together(ctx, monkeypatch):
    in_service(ctx, "web1", "web2", "web3")
    lb = ctx.provider.load_balancer
    events: list[tuple[str, object]] = []
    ensure, drain = lb.ensure, lb.drain
    monkeypatch.setattr(lb, "ensure", lambda backends: (events.append(("lb", sorted(b.name for b in backends))),
                                                        ensure(backends)))
    monkeypatch.setattr(lb, "drain", lambda name: (events.append(("drain", name)), drain(name)))
    assert ctx.state.by_role("worker")   # the migrations run on it, while the new servers start
    def migrate(c, new, old, record, migrated=None):
        events.append(("migrated", c.release.id))
        migrated.set()
    monkeypatch.setattr(rollout, "migrate_and_update_workers", migrate)
    new = Release("fedcba987654", "fedcba9876543210", ctx.require_release().path)
    rollout.serial(ctx, Phases(), new, ["web1", "web2", "web3"])
    # once, on the new release, before any new server takes traffic
    assert events[0] == ("migrated", new.id)
    # the three new servers launched at once: in service together, beside the old ones
    assert events[1] == ("lb", ["web1", "web2", "web3", "web4", "web5", "web6"])
    # then the old ones drained together, and only the new ones left
    assert events[2:5] == [("drain", "web1"), ("drain", "web2"), ("drain", "web3")]
    assert events[-1] == ("lb", ["web4", "web5", "web6"])
    assert sorted(r.name for r in ctx.state.by_role("web")) == ["web4", "web5", "web6"]
    assert all(ctx.state.servers[n].release == new.id for n in ("web4", "web5", "web6"))


def test_celery_failing_on_the_new_release_takes_the_new_servers_out_again(ctx, monkeypatch):
    in_service(ctx, "web1", "web2")
    old = ctx.require_release()

    def migrated_but_celery_fails(c, new, old_release, record, migrated=None):
        migrated.set()   # the new servers may take traffic now
        raise FabulaError("celery did not start")
    monkeypatch.setattr(rollout, "migrate_and_update_workers", migrated_but_celery_fails)
    lb, seen = ctx.provider.load_balancer, []
    ensure = lb.ensure
    monkeypatch.setattr(lb, "ensure", lambda backends: (seen.append([b.name for b in backends]), ensure(backends)))
    new = Release("fedcba987654", "fedcba9876543210", old.path)
    with pytest.raises(FabulaError, match="celery did not start") as failed:
        rollout.serial(ctx, Phases(), new, ["web1", "web2"])
    assert f"the site still serves release {old.id}" in str(failed.value)
    # web4 and web5 came and went; the old servers still serve (web3 was not in service)
    assert sorted(r.name for r in ctx.state.by_role("web")) == ["web1", "web2", "web3"]
    assert sorted(b.name for b in ctx.provider.load_balancer.backends) == ["web1", "web2"]
    assert any({"web4", "web5"} <= set(backends) for backends in seen)   # they had taken traffic
    assert "web4" not in ctx.provider.hosts and "web5" not in ctx.provider.hosts


def test_a_failed_launch_takes_the_worker_back_to_the_old_release(ctx, monkeypatch):
    in_service(ctx, "web1", "web2", "web3")
    old = ctx.require_release()
    monkeypatch.setattr(rollout, "migrate_and_update_workers", lambda *args: None)   # the worker moved on
    went_back: list[str] = []
    monkeypatch.setattr(rollout, "update_workers", lambda c, release: went_back.append(release.id))

    def broken(c, host):
        raise FabulaError("gunicorn did not start")
    monkeypatch.setattr(group, "_start_web", broken)
    new = Release("fedcba987654", "fedcba9876543210", old.path)
    with pytest.raises(FabulaError, match="gunicorn did not start"):
        rollout.serial(ctx, Phases(), new, ["web1", "web2", "web3"])
    assert went_back == [old.id]
    assert sorted(r.name for r in ctx.state.by_role("web")) == ["web1", "web2", "web3"]   # the new ones removed


def test_a_serial_deploy_in_batches_replaces_as_many_old_servers_as_it_launched(ctx, monkeypatch):
    in_service(ctx, "web1", "web2", "web3")
    lb = ctx.provider.load_balancer
    drained: list[str] = []
    drain = lb.drain
    monkeypatch.setattr(lb, "drain", lambda name: (drained.append(f"{name} among {len(lb.backends)}"), drain(name)))
    monkeypatch.setattr(rollout, "migrate_and_update_workers", lambda *args: None)
    rollout.serial(ctx, Phases(), Release("fedcba987654", "fedcba9876543210", ctx.require_release().path),
                   ["web1", "web2", "web3"], surge=2)
    # two new beside three old, two old drained; then one new beside the one old left
    assert drained == ["web1 among 5", "web2 among 5", "web3 among 4"]
    assert sorted(r.name for r in ctx.state.by_role("web")) == ["web4", "web5", "web6"]


def test_a_batch_that_fails_removes_every_server_it_launched(ctx):
    with pytest.raises(RuntimeError, match="does not start"):
        launch_or_remove_many(ctx, ctx.require_release(), 2, in_service=False, then=broken)
    assert web_group(ctx).members() == ["web1", "web2", "web3"]
    assert "web4" not in ctx.provider.hosts and "web5" not in ctx.provider.hosts


class LaunchedByItself(NativeGroup):
    """The group after it launched i-0new by itself (its scaling policy, or a replacement) and
    terminated web1."""

    def in_service(self) -> list[Member]:
        return [Member(name, f"10.0.0.{20 + n}", "abcdef012345") for n, name in enumerate(["web2", "web3", "i-0new"])]


def test_what_the_group_launches_by_itself_is_converged_and_what_it_terminated_forgotten(ctx):
    """fabula's program on the platform host, each round (deploy/native.keep)."""
    group = LaunchedByItself()
    ctx.provider = NativeProvider(group, state=ctx.state)
    done = keep(ctx, group, ctx.require_release())
    assert done == {"converged": ["i-0new"], "forgotten": ["web1"]}
    assert sorted(r.name for r in ctx.state.by_role("web")) == ["i-0new", "web2", "web3"]
    assert ctx.state.servers["i-0new"].release == "abcdef012345"
    assert ctx.state.servers["i-0new"].address == "10.0.0.22"
    assert ctx.provider.load_balancer.health()["i-0new"] == "UP"   # in service once converged
    new = ctx.provider.hosts["i-0new"]   # the release copied there, its gunicorn under its supervisor
    assert "gunicorn" in new.programs() and new.ran("ln", "-sfn", "releases/abcdef012345")
    # a round with nothing new changes nothing
    assert keep(ctx, group, ctx.require_release()) == {"converged": [], "forgotten": []}


def test_the_new_servers_start_while_the_migration_plan_is_read(ctx, monkeypatch):
    in_service(ctx, "web1", "web2")
    new = Release("fedcba987654", "fedcba9876543210", ctx.require_release().path)
    seen: list[list[str]] = []

    def plan(c, release):   # while it runs, the new servers are recorded (and launching)
        seen.append(sorted(r.name for r in c.state.by_role("web")))
        return []
    monkeypatch.setattr(rollout, "migration_plan", plan)
    deploy_plan, launch = rollout.plan_while_launching(ctx, new, "serial", own_group=True)
    assert launch is not None and seen == [["web1", "web2", "web3", "web4", "web5", "web6"]]
    assert deploy_plan.replace == ["web1", "web2", "web3"]   # the old ones only
    assert sorted(r.name for r in launch.records()) == ["web4", "web5", "web6"]
    assert all("gunicorn" in ctx.provider.hosts[n].programs() for n in ("web4", "web5", "web6"))
    assert "web4" not in ctx.provider.load_balancer.health()   # out of rotation until the deploy goes on


def test_a_refused_plan_removes_the_servers_it_launched(ctx, monkeypatch):
    in_service(ctx, "web1", "web2")
    unsafe = [{"migration": "notes.0002", "operations": [
        {"additive": False, "description": "Remove field body", "why": "old code reads it"}]}]
    monkeypatch.setattr(rollout, "migration_plan", lambda c, release: unsafe)
    new = Release("fedcba987654", "fedcba9876543210", ctx.require_release().path)
    with pytest.raises(FabulaError, match="not backwards-compatible"):
        rollout.plan_while_launching(ctx, new, "serial", own_group=True)
    assert sorted(r.name for r in ctx.state.by_role("web")) == ["web1", "web2", "web3"]
    assert not {"web4", "web5", "web6"} & set(ctx.provider.hosts)
    assert sorted(b.name for b in ctx.provider.load_balancer.backends) == ["web1", "web2"]


def test_a_providers_own_group_launches_nothing_before_the_plan(ctx, monkeypatch):
    monkeypatch.setattr(rollout, "migration_plan", lambda c, release: [])
    new = Release("fedcba987654", "fedcba9876543210", ctx.require_release().path)
    plan, launch = rollout.plan_while_launching(ctx, new, None, own_group=False)
    assert launch is None and plan.strategy == "serial"
    assert sorted(r.name for r in ctx.state.by_role("web")) == ["web1", "web2", "web3"]


def test_an_interrupted_deploy_waits_for_its_launch_before_it_lets_go(ctx, monkeypatch):
    """The lock is let go on the way out: a launch still running then could race the next command."""
    started, go_on = threading.Event(), threading.Event()
    start_web = group._start_web

    def slow(c, host):
        started.set()
        go_on.wait(10)
        start_web(c, host)
    monkeypatch.setattr(group, "_start_web", slow)
    launch = rollout.Launch(ctx, Release("fedcba987654", "fedcba9876543210", ctx.require_release().path), 1)
    started.wait(10)

    def interrupted(timeout=None):   # Ctrl-C while the deploy waits for the launch
        threading.Timer(0.3, go_on.set).start()
        raise KeyboardInterrupt
    monkeypatch.setattr(launch._future, "result", interrupted)
    with pytest.raises(KeyboardInterrupt):
        launch.records()
    assert launch._future.done() and "gunicorn" in ctx.provider.hosts["web4"].programs()
