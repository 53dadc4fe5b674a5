"""The web group's autoscaling: the decision (demand, counts, cooldowns -> decision and reason),
the demand meter, the health tracker, the desired count create uses, and fabula.yml validation."""
from __future__ import annotations

import textwrap

import pytest

from fabula.autoscaling.policy import (
    HOLD,
    SCALE_IN,
    SCALE_OUT,
    DemandMeter,
    HealthTracker,
    decide,
    desired_for_create,
)
from fabula.cli.scaling import decision_line, describe_lines
from fabula.config import AutoscalingConfig, EnvironmentConfig, load_config
from fabula.errors import ConfigError
from fabula.state import EnvState


def group(**kw) -> AutoscalingConfig:
    settings = {"min": 1, "desired": 2, "max": 4, "target": 5.0, "metric": "requests",
                "scale_out_cooldown": 30, "scale_in_cooldown": 60}
    return AutoscalingConfig(**{**settings, **kw})


# -- the decision --------------------------------------------------------------------------------

def test_demand_within_target_holds():
    d = decide(group(), desired=2, in_service=2, demand=8, now=1000)
    assert (d.action, d.desired, d.blocked) == (HOLD, 2, None)
    assert "4 requests/s per server" in d.reason and "within the target 5" in d.reason


def test_demand_above_target_scales_out_to_what_it_needs():
    d = decide(group(), desired=2, in_service=2, demand=17, now=1000)
    assert (d.action, d.desired) == (SCALE_OUT, 4)  # ceil(17 / 5)
    assert "8.5 requests/s per server (17 on 2) is above the target 5" in d.reason


def test_scale_out_adds_at_least_one_and_stops_at_max():
    assert decide(group(), desired=2, in_service=2, demand=10.5, now=0).desired == 3
    assert decide(group(), desired=2, in_service=2, demand=500, now=0).desired == 4
    at_max = decide(group(), desired=4, in_service=4, demand=500, now=0)
    assert (at_max.action, at_max.blocked) == (HOLD, "max") and "at max 4" in at_max.reason


def test_scale_out_waits_for_its_cooldown():
    held = decide(group(), desired=2, in_service=2, demand=20, now=1010, last_scale_out=1000)
    assert (held.action, held.blocked) == (HOLD, "scale-out cooldown") and "20s left" in held.reason
    assert decide(group(), desired=2, in_service=2, demand=20, now=1031, last_scale_out=1000).action == SCALE_OUT
    # a recent scale-in does not hold a scale-out back
    assert decide(group(), desired=2, in_service=2, demand=20, now=1001, last_change=1000).action == SCALE_OUT


def test_scale_in_by_one_when_one_server_fewer_stays_below_target():
    d = decide(group(), desired=3, in_service=3, demand=9, now=1000)
    assert (d.action, d.desired) == (SCALE_IN, 2)
    assert "2 server(s) would have 4.5 each, below the target 5" in d.reason
    # 10 on 2 servers would be exactly the target: not below it, so the group keeps 3
    assert decide(group(), desired=3, in_service=3, demand=10, now=1000).action == HOLD


def test_scale_in_waits_for_its_cooldown_after_any_change_and_stops_at_min():
    held = decide(group(), desired=3, in_service=3, demand=0, now=1030, last_change=1000)
    assert (held.action, held.blocked) == (HOLD, "scale-in cooldown") and "30s left" in held.reason
    assert decide(group(), desired=3, in_service=3, demand=0, now=1061, last_change=1000).action == SCALE_IN
    at_min = decide(group(), desired=1, in_service=1, demand=0, now=1000)
    assert (at_min.action, at_min.blocked) == (HOLD, None)


def test_no_flapping_between_the_two_thresholds():
    # 12 requests/s: 3 servers hold (4 each); after a scale-in to 2 (6 each) it would scale out again,
    # so the scale-in must not happen in the first place
    assert decide(group(), desired=3, in_service=3, demand=12, now=0).action == HOLD


def test_waits_for_servers_not_yet_in_service_and_for_a_measurement():
    pending = decide(group(), desired=3, in_service=2, demand=50, now=0)
    assert (pending.action, pending.blocked) == (HOLD, "pending")
    assert decide(group(), desired=2, in_service=2, demand=None, now=0).action == HOLD


def test_desired_outside_min_max_is_brought_back():
    low = decide(group(min=2), desired=1, in_service=1, demand=0, now=0)
    assert (low.action, low.desired) == (SCALE_OUT, 2) and "below min 2" in low.reason
    high = decide(group(max=3), desired=4, in_service=4, demand=100, now=0)
    assert (high.action, high.desired) == (SCALE_IN, 3) and "above max 3" in high.reason


def test_sessions_metric_names_its_unit():
    d = decide(group(metric="sessions", target=2), desired=1, in_service=1, demand=6, now=0)
    assert (d.action, d.desired) == (SCALE_OUT, 3) and "6 sessions per server" in d.reason


def test_a_fixed_group_never_scales():
    fixed = EnvironmentConfig.model_validate({"servers": {"web": 2}}).web_group()
    assert decide(fixed, desired=2, in_service=2, demand=1000, now=0).action == HOLD
    assert decide(fixed, desired=2, in_service=2, demand=0, now=0).action == HOLD


# -- measuring -----------------------------------------------------------------------------------

def rows(**counts) -> dict[str, dict[str, str]]:
    return {name: {"stot": str(stot), "scur": str(scur), "qcur": "0", "status": "UP"}
            for name, (stot, scur) in counts.items()}


def test_request_rate_from_counter_deltas_over_the_window():
    meter = DemandMeter("requests", window=4)
    meter.add(0, rows(web1=(100, 0), web2=(100, 0)))
    assert meter.value() is None
    meter.add(1, rows(web1=(105, 0), web2=(105, 0)))
    assert meter.value() is None  # less than half the window measured
    meter.add(2, rows(web1=(110, 0), web2=(110, 0)))
    assert meter.value() == pytest.approx(10.0)
    for t in range(3, 10):  # the load stops: the rate falls as the window moves on
        meter.add(t, rows(web1=(110, 0), web2=(110, 0)))
    assert meter.value() == 0


def test_request_rate_counts_a_new_server_from_when_it_is_seen_and_restarts_after_a_reload():
    meter = DemandMeter("requests", window=10)
    meter.add(0, rows(web1=(0, 0)))
    meter.add(5, rows(web1=(50, 0), web3=(40, 0)))   # web3's first 40 came before we saw it
    meter.add(10, rows(web1=(100, 0), web3=(90, 0)))
    assert meter.value() == pytest.approx(150 / 10)
    meter.add(11, rows(web1=(3, 0), web3=(2, 0)))    # HAProxy reloaded: counters from 0 again
    assert meter.value() is None
    meter.add(16, rows(web1=(33, 0), web3=(32, 0)))
    assert meter.value() == pytest.approx(12.0)


def test_sessions_are_averaged_over_the_window_and_filtered_to_members():
    meter = DemandMeter("sessions", window=4)
    for t, scur in enumerate([2, 4, 6]):
        meter.add(t, {**rows(web1=(0, scur), web2=(0, scur)), "gone": {"scur": "99"}}, members={"web1", "web2"})
    assert meter.value() == pytest.approx((4 + 8 + 12) / 3)
    for t in range(3, 8):
        meter.add(t, rows(web1=(0, 0), web2=(0, 0)))
    assert meter.value() == 0


# -- health --------------------------------------------------------------------------------------

def test_a_server_failing_longer_than_the_grace_after_being_in_service_is_replaced():
    tracker = HealthTracker()
    tracker.observe(0, ["web1", "web2"], {"web1": "UP", "web2": "UP"})
    tracker.observe(1, ["web1", "web2"], {"web1": "UP 1/2", "web2": "UP"})   # one check failed: still serving
    assert tracker.unhealthy(100, grace=15) == []
    tracker.observe(2, ["web1", "web2"], {"web1": "DOWN", "web2": "UP"})
    assert tracker.unhealthy(17, grace=15) == []
    [(name, reason)] = tracker.unhealthy(17.5, grace=15)
    assert name == "web1" and "failed its health check for 16s after being in service" in reason


def test_a_server_that_recovers_within_the_grace_is_kept():
    tracker = HealthTracker()
    tracker.observe(0, ["web1"], {"web1": "UP"})
    tracker.observe(1, ["web1"], {"web1": "DOWN"})
    tracker.observe(5, ["web1"], {"web1": "DOWN 1/2"})
    tracker.observe(6, ["web1"], {"web1": "UP"})
    assert tracker.unhealthy(100, grace=15) == []


def test_a_server_never_seen_in_service_gets_the_launch_grace_and_admin_states_are_no_failure():
    tracker = HealthTracker()
    tracker.observe(0, ["web1", "web2", "web3"], {"web2": "MAINT", "web3": "DRAIN"})  # web1 not in the LB
    assert tracker.unhealthy(60, grace=15, launch_grace=120) == []
    assert [n for n, _ in tracker.unhealthy(121, grace=15, launch_grace=120)] == ["web1"]


def test_failures_are_counted_afresh_after_another_command_held_the_lock():
    tracker = HealthTracker()
    tracker.observe(0, ["web1"], {"web1": "UP"})
    tracker.observe(1, ["web1"], {"web1": "DOWN"})
    tracker.pause()
    tracker.observe(30, ["web1"], {"web1": "DOWN"})
    assert tracker.unhealthy(40, grace=15) == []
    assert tracker.unhealthy(46, grace=15) != []


def test_servers_that_left_the_group_are_forgotten():
    tracker = HealthTracker()
    tracker.observe(0, ["web1"], {"web1": "UP"})
    tracker.observe(1, ["web1"], {"web1": "DOWN"})
    tracker.observe(2, ["web2"], {"web2": "UP"})
    assert tracker.unhealthy(100, grace=1) == [] and tracker.seen_up == {"web2"}


# -- the desired count create converges to -------------------------------------------------------

def env(**autoscaling) -> EnvironmentConfig:
    return EnvironmentConfig.model_validate({"servers": {"web": 2}, "autoscaling": autoscaling or None})


def test_create_keeps_the_groups_desired_count_until_fabula_yml_changes_it():
    config = env(min=1, desired=2, max=4)
    state = EnvState(project="p", env="e")
    assert desired_for_create(config, state) == 2                 # first create: fabula.yml's
    state.web_desired, state.web_desired_config = 3, 2            # then scaled to 3
    assert desired_for_create(config, state) == 3
    assert desired_for_create(env(min=1, desired=1, max=4), state) == 1   # desired edited: it wins
    assert desired_for_create(env(min=1, desired=2, max=2), state) == 2   # max lowered: clamped


def test_without_autoscaling_servers_web_is_the_group():
    config = EnvironmentConfig.model_validate({"servers": {"web": 3}})
    state = EnvState(project="p", env="e", web_desired=2, web_desired_config=2)
    assert desired_for_create(config, state) == 3


# -- fabula.yml ----------------------------------------------------------------------------------

BASE = """\
project: polls
app: {wsgi: polls.wsgi:application, settings: polls.settings}
environments:
  testing:
    servers: {web: 2}
"""


def load(tmp_path, extra: str):
    path = tmp_path / "fabula.yml"
    path.write_text(BASE + textwrap.indent(textwrap.dedent(extra), "    "))
    return load_config(path).environment("testing")


def error(tmp_path, extra: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, extra)
    return str(caught.value)


def test_defaults(tmp_path):
    group = load(tmp_path, "autoscaling: {}\n").autoscaling
    assert (group.min, group.desired, group.max, group.metric, group.target) == (1, 2, 2, "sessions", 2.0)
    assert (group.scale_out_cooldown, group.scale_in_cooldown, group.health_grace, group.interval) == (30, 60, 15, 2)
    group = load(tmp_path, "gunicorn_workers: 4\nautoscaling: {metric: requests, max: 6}\n").autoscaling
    assert (group.desired, group.max, group.target) == (2, 6, 40.0)
    assert load(tmp_path, "autoscaling: {min: 3, max: 5}\n").autoscaling.desired == 3  # servers.web raised to min


def test_min_desired_max_must_be_in_order(tmp_path):
    message = error(tmp_path, "autoscaling: {min: 2, desired: 5, max: 4}\n")
    assert "environments.testing: autoscaling: min <= desired <= max is needed (got min=2, desired=5, max=4)" in message
    assert "min <= desired <= max" in error(tmp_path, "autoscaling: {min: 3, max: 2}\n")


def test_bad_values_name_the_key(tmp_path):
    assert "environments.testing.autoscaling.metric" in error(tmp_path, "autoscaling: {metric: cpu}\n")
    assert "environments.testing.autoscaling.target" in error(tmp_path, "autoscaling: {target: 0}\n")
    assert "environments.testing.autoscaling.min" in error(tmp_path, "autoscaling: {min: 0}\n")
    assert "environments.testing.autoscaling.interval" in error(tmp_path, "autoscaling: {interval: 0.1}\n")
    assert "unknown key 'maximum'" in error(tmp_path, "autoscaling: {maximum: 3}\n")


def test_max_must_fit_the_subnet(tmp_path):
    message = error(tmp_path, "subnet: 10.9.0.0/28\nautoscaling: {max: 4}\n")
    assert "autoscaling.max: 4 web servers" in message and "subnet 10.9.0.0/28 holds 5" in message
    assert load(tmp_path, "subnet: 10.9.0.0/27\nautoscaling: {max: 8}\n").autoscaling.max == 8


# -- what describe prints ------------------------------------------------------------------------

def test_describe_lines_show_the_group_and_its_decisions():
    report = {"configured": True, "min": 1, "desired": 3, "max": 4, "metric": "requests", "target": 5.0,
              "in_service": 3, "demand": {"total": 13.5, "per_server": 4.5, "source": "autoscaler"},
              "suspended": ["healing"], "controller": "running",
              "decisions": [{"time": "2026-01-02T03:04:05+00:00", "action": "scale-out", "from": 2, "to": 3,
                             "launched": ["web5"], "reason": "demand", "outcome": "ok", "seconds": 7.25}]}
    lines = describe_lines(report)
    assert lines[0] == "web group: 3 in service, desired 3 (min 1, max 4), autoscaling"
    assert "target 5 requests/s per server; demand now 4.5 requests/s per server (13.5 in all)" in lines[1]
    assert "autoscaler running; suspended: healing" in lines[1]
    assert lines[2] == "  2026-01-02 03:04:05 scale-out 2 -> 3 + web5: demand [ok, 7.2s]"
    assert decision_line({"action": "replace", "retired": ["web1"], "launched": ["web3"], "reason": "r",
                          "outcome": "failed", "error": "boom"}).endswith("replace - web1 + web3: r [failed]: boom")


def test_describe_lines_show_the_platforms_own_group_in_its_words():
    report = {"configured": True, "min": 2, "desired": 2, "max": 8, "metric": "requests", "target": 100.0,
              "in_service": 2, "demand": {"total": None, "per_server": None, "source": "load balancer"},
              "suspended": [], "controller": "running, converging what the platform's group launches", "decisions": [],
              "platform_group": {
                  "name": "shop-production-web", "exists": True, "min": 2, "desired": 3, "max": 8,
                  "release": "0123456789ab", "suspended": ["AZRebalance"],
                  "scaling": "target tracking: ALBRequestCountPerTarget at 6000",
                  "instances": [{"name": "i-1", "lifecycle": "InService", "health": "Healthy", "target": "healthy",
                                 "release": "0123456789ab"},
                                {"name": "i-2", "lifecycle": "Pending", "health": "Healthy", "target": None,
                                 "release": "0123456789ab"}]}}
    lines = describe_lines(report)
    assert "autoscaler running, converging what the platform's group launches" in lines[1]
    assert lines[2] == ("  platform group shop-production-web: desired 3 (min 2, max 8), release 0123456789ab; "
                        "target tracking: ALBRequestCountPerTarget at 6000; suspended: AZRebalance")
    assert lines[3] == "    i-1: InService, Healthy, target healthy, release 0123456789ab"
    assert lines[4] == "    i-2: Pending, Healthy, target not registered, release 0123456789ab"
    report["platform_group"] = {"name": "shop-production-web", "exists": False}
    assert describe_lines(report)[2] == "  platform group shop-production-web: not made yet (`fabula create` makes it)"
