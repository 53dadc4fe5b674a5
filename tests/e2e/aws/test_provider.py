"""`provider: aws` end to end in the lab: create, a page through the (stand-in) load balancer,
the Auto Scaling group in `describe`, `exec` on an instance, an instance the group launches by
itself converged by fabula's program on the worker, a second create that changes nothing on AWS,
and destroy leaving nothing tagged and no instance running."""
from __future__ import annotations

import time
from pathlib import Path

import httpx

from fabula.accounts import Accounts
from fabula.state import EnvPaths
from tests.helpers import wait_for


def test_create_serves_the_app_through_the_load_balancer(lab, environment):
    def served() -> bool:
        try:
            return httpx.get(environment.url + "/", verify=False, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False
    wait_for(served, 60, message="the app through the stand-in ALB")
    described = environment.describe()
    assert {s["role"] for s in described["servers"]} >= {"web", "worker", "cache", "db-primary", "db-replica"}
    # the Auto Scaling group in AWS's words: its two instances in service and healthy in the target group
    group = described["autoscaling"]["platform_group"]
    webs = sorted(s["name"] for s in described["servers"] if s["role"] == "web")
    assert group["exists"] and group["desired"] == 2 and group["release"] == described["release"]
    assert [(i["name"], i["lifecycle"], i["target"]) for i in group["instances"]] == \
        [(name, "InService", "healthy") for name in webs]


def test_exec_runs_on_the_instance(environment):
    worker = environment.server("worker1")
    ran = environment.exec("worker1", "hostname", "-I")
    assert ran.returncode == 0 and worker["address"] in ran.stdout.split()


def test_the_instance_metadata_is_roots_only(environment):
    """fabula's program on the worker takes the instance role's credentials there; the app's
    users (Celery runs on the worker) are refused at once."""
    script = ("import socket\ntry:\n    socket.create_connection(('169.254.169.254', 80), 3)\n"
              "except OSError as exc:\n    print(type(exc).__name__)")
    project = environment.describe()["project"]
    app_user = Accounts(EnvPaths(environment.state_dir, project, environment.name).tag).app
    ran = environment.exec("worker1", "runuser", "-u", app_user, "--", "python3", "-c", script)
    assert ran.returncode == 0 and ran.stdout.strip() == "ConnectionRefusedError", ran.stdout + ran.stderr


def test_what_the_group_launches_by_itself_is_converged_and_serves(lab, environment):
    """As the group's own scaling policy would: its desired count raised and lowered on AWS,
    not through fabula. fabula's program on the worker (shipped there: its own runtime, config
    and state, credentials from the instance's metadata) converges the new instance, which then
    answers through the load balancer, and forgets the one the group terminates."""
    group = environment.describe()["autoscaling"]["platform_group"]["name"]
    autoscaling = lab.client("autoscaling")
    before = {s["name"] for s in environment.describe()["servers"] if s["role"] == "web"}
    asked = time.monotonic()
    autoscaling.set_desired_capacity(AutoScalingGroupName=group, DesiredCapacity=3, HonorCooldown=False)
    (launched,) = {i["InstanceId"] for i in autoscaling.describe_auto_scaling_groups(
        AutoScalingGroupNames=[group])["AutoScalingGroups"][0]["Instances"]} - before
    answered: set[str] = set()

    def served_by_the_new_instance() -> bool:
        try:
            answered.add(httpx.get(environment.url + "/api/info", verify=False, timeout=5).json()["server"])
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        return launched in answered
    try:
        wait_for(served_by_the_new_instance, 300, interval=0.5,
                 message=f"{launched}, launched by the group itself, answering through the load balancer")
    except AssertionError as exc:   # what fabula's program says (the lab's instances share files)
        log = Path("/srv/fabula", environment.describe()["project"], environment.name, "worker1", "log",
                   "autoscaler.log")
        raise AssertionError(f"{exc}\nfabula's program:\n{log.read_text()[-3000:]}") from None
    lab.log(f"the group's own scale-out: {launched} answered {time.monotonic() - asked:.1f}s after the launch")
    assert launched in {s["name"] for s in environment.describe()["servers"] if s["role"] == "web"}

    autoscaling.set_desired_capacity(AutoScalingGroupName=group, DesiredCapacity=2, HonorCooldown=False)

    def recorded_as_the_group_has_them() -> bool:
        members = {i["InstanceId"] for i in autoscaling.describe_auto_scaling_groups(
            AutoScalingGroupNames=[group])["AutoScalingGroups"][0]["Instances"]}
        webs = {s["name"] for s in environment.describe()["servers"] if s["role"] == "web"}
        return len(members) == 2 and webs == members
    wait_for(recorded_as_the_group_has_them, 120, interval=1,
             message="the instance the group terminated forgotten by fabula")


def test_a_second_create_changes_nothing_on_aws(lab, environment):
    again = environment.fabula("create", environment.name, timeout=900)
    assert again.returncode == 0, again.stderr
    assert "AWS API calls: none changed a resource" in again.stderr, again.stderr[-3000:]
    assert len(lab.live_instances()) == 6   # the four fixed roles' and the group's two
    lab.log("second create:\n" + again.stderr)


def test_destroy_leaves_nothing_tagged_and_no_instance_running(lab, environment):
    tag = f"{environment.project}-{environment.name}"
    assert lab.tagged_resources(tag) and lab.live_instances()
    destroyed = environment.fabula("destroy", environment.name, "--yes", timeout=600)
    assert destroyed.returncode == 0, destroyed.stderr
    assert lab.live_instances() == [] and lab.tagged_resources(tag) == []
    assert lab.machines == {}   # every instance's namespace gone, with its processes
