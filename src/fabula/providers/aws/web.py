"""The web tier on AWS as fabula's interfaces: the ALB's target group as the LoadBalancer (its
targets are instances, registered by id; their health is the target group's), and the Auto
Scaling group as the WebGroup.

A backend's name is its inventory record's (the instance's `fabula:server` tag) or, for an
instance the group launched, its instance id. moto's target health is always `healthy` and knows
no `draining` (a deregistered target vanishes at once): the e2e harness makes it real.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fabula.errors import FabulaError
from fabula.providers.aws import group as web_group
from fabula.providers.aws.cloud import Cloud, aws_errors, described
from fabula.providers.aws.instances import Instance, find, find_member
from fabula.providers.aws.loadbalancer import HTTPS_PORT
from fabula.providers.base import Backend, LoadBalancer, Member, NativeWebGroup

# the target group's states as fabula's (HAProxy's words, which the deploy and autoscaler read)
STATUS = {"healthy": "UP", "draining": "DRAIN", "unused": "MAINT", "initial": "DOWN", "unhealthy": "DOWN",
          "unavailable": "DOWN"}
# fabula's processes (autoscaling/policy.py's) as the Auto Scaling group's: its target-tracking
# policy acts through CloudWatch alarms; replacing a failing instance is ReplaceUnhealthy
PROCESSES = {"scaling": ("AlarmNotification",), "healing": ("ReplaceUnhealthy",)}
ALL_PROCESSES = ("Launch", "Terminate")   # suspended with both: the group then changes nothing itself
POLL_INTERVAL = 5.0   # seconds between looks at a group whose instances are launching


class AlbLoadBalancer(LoadBalancer):
    def __init__(self, cloud: Cloud, https_port: int):
        self.cloud, self.https_port = cloud, https_port

    # -- the ALB and its target group, found by name (made by ensure_control_plane) ---------------
    def _find(self, describe: Any, key: str, name: str, missing: str) -> dict[str, Any] | None:
        found = described(describe, key, missing, Names=[name])
        return found[0] if found else None

    def _balancer(self) -> dict[str, Any] | None:
        return self._find(self.cloud.elbv2.describe_load_balancers, "LoadBalancers", self.cloud.short_name("lb"),
                          "LoadBalancerNotFound")

    def arn(self) -> str:
        balancer = self._balancer()
        if balancer is None:
            raise FabulaError(f"the load balancer {self.cloud.short_name('lb')} does not exist",
                              "run `fabula create` first")
        return str(balancer["LoadBalancerArn"])

    def target_group_arn(self) -> str:
        group = self._find(self.cloud.elbv2.describe_target_groups, "TargetGroups", self.cloud.short_name("web"),
                           "TargetGroupNotFound")
        if group is None:
            raise FabulaError(f"the target group {self.cloud.short_name('web')} does not exist",
                              "run `fabula create` first")
        return str(group["TargetGroupArn"])

    # -- targets ------------------------------------------------------------------------------------
    def _targets(self) -> dict[str, str]:
        """Instance id -> the target group's state for it."""
        descriptions = self.cloud.elbv2.describe_target_health(TargetGroupArn=self.target_group_arn())
        return {d["Target"]["Id"]: d["TargetHealth"]["State"] for d in descriptions["TargetHealthDescriptions"]}

    def _instances(self, ids: list[str]) -> dict[str, Instance]:
        return {i.id: i for i in find(self.cloud, ids=ids)} if ids else {}

    def _instance_id(self, name: str, address: str | None = None) -> str:
        """An instance id for a backend: the inventory's record, an instance id, or the address."""
        named = find(self.cloud, name)
        if named:
            return named[0].id
        if name.startswith("i-"):
            return name
        if address:
            by_address = [i for i in find(self.cloud) if i.private_ip == address]
            if by_address:
                return by_address[0].id
        raise FabulaError(f"no instance of environment {self.cloud.tag_value} is named {name}",
                          "run `fabula describe` to see the environment's servers")

    @aws_errors
    def ensure(self, backends: list[Backend]) -> None:
        arn = self.target_group_arn()
        wanted = {self._instance_id(b.name, b.address) for b in backends}
        have = set(self._targets())
        if wanted - have:
            self.cloud.elbv2.register_targets(TargetGroupArn=arn, Targets=[
                {"Id": i, "Port": HTTPS_PORT} for i in sorted(wanted - have)])
        if have - wanted:
            self.cloud.elbv2.deregister_targets(TargetGroupArn=arn, Targets=[
                {"Id": i, "Port": HTTPS_PORT} for i in sorted(have - wanted)])

    @aws_errors
    def targets_by_instance(self) -> dict[str, str]:
        """Instance id -> the target group's own word for it (healthy, initial, draining...)."""
        return self._targets()

    @aws_errors
    def health(self) -> dict[str, str]:
        targets = self._targets()
        names = self._instances(list(targets))
        return {(names[i].name if i in names else i): STATUS.get(state, "DOWN") for i, state in targets.items()}

    @aws_errors
    def drain(self, name: str) -> None:
        self.cloud.elbv2.deregister_targets(TargetGroupArn=self.target_group_arn(), Targets=[
            {"Id": self._instance_id(name), "Port": HTTPS_PORT}])

    @aws_errors
    def ready(self, name: str) -> None:
        self.cloud.elbv2.register_targets(TargetGroupArn=self.target_group_arn(), Targets=[
            {"Id": self._instance_id(name), "Port": HTTPS_PORT}])

    @aws_errors
    def active_requests(self, name: str) -> int:
        # the ALB publishes no per-target count of requests in flight: while AWS says `draining`
        # some may be, and once the target is gone (its deregistration delay over) none are
        return 1 if self._targets().get(self._instance_id(name)) == "draining" else 0

    @aws_errors
    def stats(self) -> dict[str, dict[str, str]]:
        return {name: {"scur": "0", "req_rate": "0", "status": status} for name, status in self.health().items()}

    @aws_errors
    def is_running(self) -> bool:
        balancer = self._balancer()
        return balancer is not None and balancer.get("State", {}).get("Code") == "active"

    @aws_errors
    def url(self) -> str:
        balancer = self._balancer()
        if balancer is None:
            raise FabulaError(f"the load balancer {self.cloud.short_name('lb')} does not exist",
                              "run `fabula create` first")
        port = "" if self.https_port == 443 else f":{self.https_port}"
        return f"https://{balancer['DNSName']}{port}/"


class AwsWebGroup(NativeWebGroup):
    """The Auto Scaling group: its members are named by instance id (it names them, not fabula).
    `launch_from` is the provider's (it knows the control plane a launch template needs);
    `forget` removes a terminated member's host key; `clock` and the Cloud's sleep pace the waits."""

    def __init__(self, cloud: Cloud, load_balancer: AlbLoadBalancer, *,
                 launch_from: Callable[[str], bool] | None = None,
                 forget: Callable[[Instance], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cloud, self.load_balancer = cloud, load_balancer
        self._launch_from, self._forget, self.clock = launch_from, forget, clock

    def _group(self) -> dict[str, Any] | None:
        found = self.cloud.autoscaling.describe_auto_scaling_groups(
            AutoScalingGroupNames=[web_group.group_name(self.cloud)])["AutoScalingGroups"]
        return found[0] if found else None

    @aws_errors
    def desired(self) -> int:
        group = self._group()
        return int(group["DesiredCapacity"]) if group else 0

    @aws_errors
    def members(self) -> list[str]:
        group = self._group()
        return sorted(i["InstanceId"] for i in (group or {}).get("Instances", [])
                      if i.get("LifecycleState") not in ("Terminating", "Terminated"))

    @aws_errors
    def set_desired(self, count: int) -> dict:
        before, members = self.desired(), set(self.members())
        if self._group() is None:
            raise FabulaError(f"the web group {web_group.group_name(self.cloud)} does not exist",
                              "run `fabula create` first")
        web_group.set_desired(self.cloud, count)
        after = set(self.members())
        changed: dict[str, Any] = {"from": before, "to": count}
        if after - members:
            changed["launched"] = sorted(after - members)
        if members - after:
            changed["retired"] = sorted(members - after)
        return changed

    @aws_errors
    def health(self) -> dict[str, str]:
        members = set(self.members())
        return {name: status for name, status in self.load_balancer.health().items() if name in members}

    def release(self) -> str | None:
        return web_group.group_template(self.cloud)

    # -- what fabula needs to converge the group's instances (deploy/native.py) --------------------
    def launch_from(self, release: str) -> bool:
        if self._launch_from is None:
            raise FabulaError("this view of the web group cannot make launch templates (internal error)")
        return self._launch_from(release)

    @aws_errors
    def in_service(self) -> list[Member]:
        """The members the group counts in service (InService: the group registered them with
        the target group by then), whose instance is running."""
        group = self._group() or {}
        ids = [i["InstanceId"] for i in group.get("Instances", []) if i.get("LifecycleState") == "InService"]
        running = [i for i in find(self.cloud, ids=ids) if i.state == "running"] if ids else []
        return sorted((Member(i.id, i.private_ip, i.release) for i in running), key=lambda m: m.name)

    def wait_members(self, count: int, timeout: float) -> list[Member]:
        deadline = self.clock() + timeout
        while True:
            members = self.in_service()
            if len(members) == count:
                return members
            if self.clock() > deadline:
                suspended = web_group.suspended_processes(self.cloud)
                why = f" (its processes {', '.join(suspended)} are suspended)" if suspended else ""
                raise FabulaError(f"the web group {web_group.group_name(self.cloud)} has {len(members)} running "
                                  f"instance(s) in service after {timeout:.0f}s, not {count}{why}",
                                  "`fabula autoscaling ENV resume` if its processes are suspended; else see the "
                                  "group's activity history in the AWS console (quota, capacity, the image)")
            self.cloud.sleep(POLL_INTERVAL)

    def terminate(self, name: str) -> None:
        instance = find_member(self.cloud, name)
        if instance is None:
            return   # gone already: what a re-run after a crash meets
        web_group.terminate_member(self.cloud, name)
        if self._forget is not None:
            self._forget(instance)

    @aws_errors
    def report(self) -> dict:
        name = web_group.group_name(self.cloud)
        group = self._group()
        if group is None:
            return {"name": name, "exists": False}
        targets = self.load_balancer.targets_by_instance()
        ids = [i["InstanceId"] for i in group.get("Instances", [])]
        releases = {i.id: i.release for i in find(self.cloud, ids=ids)} if ids else {}
        policies = self.cloud.autoscaling.describe_policies(AutoScalingGroupName=name)["ScalingPolicies"]
        tracking = [p["TargetTrackingConfiguration"] for p in policies if p.get("TargetTrackingConfiguration")]
        scaling = None
        if tracking:
            metric = tracking[0].get("PredefinedMetricSpecification", {}).get("PredefinedMetricType", "a metric")
            scaling = f"target tracking: {metric} at {tracking[0]['TargetValue']:g}"
        return {
            "name": name, "exists": True, "min": group["MinSize"], "desired": group["DesiredCapacity"],
            "max": group["MaxSize"], "release": self.release(),
            "suspended": sorted(p["ProcessName"] for p in group.get("SuspendedProcesses", [])),
            "scaling": scaling,
            "instances": [{"name": i["InstanceId"], "lifecycle": i.get("LifecycleState"),
                           "health": i.get("HealthStatus"), "target": targets.get(i["InstanceId"]),
                           "release": releases.get(i["InstanceId"])}
                          for i in sorted(group.get("Instances", []), key=lambda i: i["InstanceId"])],
        }

    def suspend(self, processes: list[str], suspend: bool) -> None:
        # Launch and Terminate are held only while both are: a deploy and `fabula scale` need them
        named = {name for p in processes for name in PROCESSES.get(p, ())}
        if suspend and set(PROCESSES) <= set(processes):
            named |= set(ALL_PROCESSES)
        if not suspend:
            named |= set(ALL_PROCESSES)
        web_group.set_processes(self.cloud, sorted(named), suspend)
