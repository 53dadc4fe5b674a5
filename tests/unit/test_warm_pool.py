"""The web group's warm pool (autoscaling.warm), on fake servers: its servers are started out of the
load balancer and are no members of the group; a scale-out and a replacement take one before
launching any; after a deploy it is started again from the group's new release."""
from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

from fabula.autoscaling import actions, warm_pool
from fabula.autoscaling.group import web_group
from fabula.context import Context, Release
from fabula.deploy.group import reserve_web_servers
from fabula.topology import plan_servers
from tests.unit.test_web_group import ctx, in_service  # noqa: F401 - the fixture

assert ctx  # the fixture, used by name below


def with_pool(ctx: Context, warm: int) -> None:   # noqa: F811 - the fixture's name
    assert ctx.env.autoscaling is not None
    ctx.env = ctx.env.model_copy(update={"autoscaling": ctx.env.autoscaling.model_copy(update={"warm": warm})})
    in_service(ctx, "web1", "web2", "web3")
    built = ctx.paths.releases_dir / "abcdef012345"   # the launch configuration, built
    built.mkdir(parents=True)
    (built / "release.json").write_text('{"commit": "abcdef0123456789"}')


def operation() -> SimpleNamespace:
    return SimpleNamespace(details={}, phase=lambda name: nullcontext())


def test_the_pool_is_started_out_of_the_load_balancer_and_is_no_member_of_the_group(ctx):  # noqa: F811
    with_pool(ctx, 1)
    assert warm_pool.upkeep(ctx) == "the warm pool has 0 server(s) of the group's release, 1 wanted"
    assert warm_pool.keep(ctx, operation(), ctx.require_release()) == {"warmed": ["web4"]}
    assert "web4" in ctx.provider.hosts and ctx.state.servers["web4"].release == "abcdef012345"
    assert "web4" not in ctx.provider.load_balancer.health()
    assert web_group(ctx).members() == ["web1", "web2", "web3"]
    assert warm_pool.upkeep(ctx) is None


def test_a_scale_out_puts_the_warm_server_in_service_before_launching_any(ctx):  # noqa: F811
    with_pool(ctx, 1)
    warm_pool.keep(ctx, operation(), ctx.require_release())
    done = web_group(ctx).set_desired(4)
    assert done["launched"] == ["web4"]   # the warm one: no web5 launched
    assert sorted(ctx.provider.hosts) == sorted(n for n in ctx.state.servers)
    assert web_group(ctx).members() == ["web1", "web2", "web3", "web4"]
    assert ctx.provider.load_balancer.health()["web4"] == "UP"
    assert ctx.state.warm_pool() == []
    assert warm_pool.upkeep(ctx) == "the warm pool has 0 server(s) of the group's release, 1 wanted"


def test_a_replacement_takes_the_warm_server(ctx):  # noqa: F811
    with_pool(ctx, 1)
    warm_pool.keep(ctx, operation(), ctx.require_release())
    done = actions.replace(ctx, operation(), "web2")
    assert done == {"retired": ["web2"], "launched": ["web4"], "from_warm_pool": ["web4"]}
    assert web_group(ctx).members() == ["web1", "web3", "web4"] and "web2" not in ctx.provider.hosts


def test_a_warm_server_of_an_older_release_is_replaced_by_one_of_the_groups(ctx):  # noqa: F811
    with_pool(ctx, 1)
    reserve_web_servers(ctx, ctx.require_release(), 1, warm=True)   # web4, of the release before the deploy
    ctx.provider.ensure_server("web4", "web")
    ctx.state.release = "0123456789ab"   # a deploy changed the group's release
    assert "web4 of the warm pool run(s) another release" in (warm_pool.upkeep(ctx) or "")
    new = Release("0123456789ab", "0123456789abcdef", ctx.require_release().path)
    assert warm_pool.keep(ctx, operation(), new) == {"retired": ["web4"], "warmed": ["web5"]}
    assert [(r.name, r.release) for r in ctx.state.warm_pool()] == [("web5", "0123456789ab")]
    assert "web4" not in ctx.provider.hosts and warm_pool.upkeep(ctx) is None


def test_a_warm_server_that_fails_its_health_check_is_retired_and_a_server_launched(ctx, monkeypatch):  # noqa: F811
    with_pool(ctx, 1)
    warm_pool.keep(ctx, operation(), ctx.require_release())   # web4
    lb = ctx.provider.load_balancer
    healthy = lb.health
    monkeypatch.setattr(lb, "health", lambda: {**healthy(), **({"web4": "DOWN"} if "web4" in healthy() else {})})
    monkeypatch.setattr(warm_pool, "TAKE_TIMEOUT", 0.3)
    done = actions.replace(ctx, operation(), "web2")
    assert done["from_warm_pool"] == [] and done["launched"] == ["web5"]
    assert "web4" not in ctx.state.servers and "web4" not in ctx.provider.hosts
    assert web_group(ctx).members() == ["web1", "web3", "web5"]


def test_create_keeps_the_warm_pool_and_never_reuses_its_names(ctx):  # noqa: F811
    with_pool(ctx, 1)
    warm_pool.keep(ctx, operation(), ctx.require_release())   # web4
    ctx.state.web_desired = 4
    planned = plan_servers(ctx.env, ctx.state)
    assert planned["web4"].warm and planned["web4"].address == ctx.state.servers["web4"].address
    assert sorted(n for n, r in planned.items() if r.role == "web" and not r.warm) == ["web1", "web2", "web3", "web5"]
