"""AWS for the end-to-end tests: moto's server as the control plane, network namespaces as the
data plane.

- One `ThreadedMotoServer` in the test process, on the lab's bridge address, so that the CLI (a
  separate process) and anything inside the lab reach it through `AWS_ENDPOINT_URL`.
- Each instance moto starts (`run_instances`, also for the Auto Scaling group) becomes a network
  namespace at the instance's private address (and its public one, routed to it) running its own
  sshd, which admits the key of the instance's EC2 key pair, as cloud-init would; a terminated
  instance's namespace goes with its processes.
- The target groups' health is real: moto says every registered target is healthy at once;
  here a prober checks each one over HTTPS (`GET /healthcheck.html`, the target group's
  thresholds) and a deregistered target drains while the stand-in below still has requests in
  flight to it (as the ALB does), up to the deregistration delay.
- The ALB's data plane is an HAProxy on this machine that sends requests only to the targets the
  prober found healthy (set through its runtime API: no reload, no connection dropped). Its
  address is `AwsLab.url`, what the ALB's DNS name would resolve to.

Everything goes afterwards, also when a test fails.
"""
from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fabula import pki
from fabula.sample import free_ports
from tests.helpers import wait_for

SRV = "/srv/fabula"          # where fabula puts its servers' trees on a host
REGION = "eu-west-1"
ACCOUNT = "123456789012"   # moto's default account
SLOTS = 16                 # the stand-in ALB's server slots: more targets than any test registers
HSTS_ATTRIBUTE = "routing.http.response.strict_transport_security.header_value"
_ACTIVE: list[str] = []    # the lab running in this process, if any (one at a time)
PROBE_INTERVAL = 0.5       # the prober's pace (an ALB's floor is 5 s: the thresholds are the group's)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def free_vpc() -> ipaddress.IPv4Network:
    """A 10.x.0.0/16 that no address or route of this machine is in."""
    taken = sh("ip", "-4", "-o", "addr").stdout + sh("ip", "-4", "route").stdout
    free = [x for x in range(60, 200) if f"10.{x}." not in taken]
    if not free:
        pytest.skip("no free 10.x.0.0/16 for the lab's VPC")
    return ipaddress.ip_network(f"10.{secrets.choice(free)}.0.0/16")


@dataclass
class Machine:
    instance_id: str
    namespace: str
    veth: str
    addresses: list[str]
    home: Path
    tags: dict[str, str] = field(default_factory=dict)   # its EC2 tags when it started
    sshd: subprocess.Popen | None = None
    firewall: str = ""    # the nftables table its security groups made, as last applied


@dataclass
class TargetHealth:
    state: str = "initial"          # initial, healthy, unhealthy, draining
    passes: int = 0
    fails: int = 0
    draining_since: float = 0.0
    draining_until: float = 0.0


@dataclass
class AwsLab:
    tag: str
    tmp: Path
    vpc: ipaddress.IPv4Network
    endpoint: str = ""
    machines: dict[str, Machine] = field(default_factory=dict)
    health: dict[tuple[str, str], TargetHealth] = field(default_factory=dict)
    https_port: int = 0
    http_port: int = 0
    alb: StandInAlb | None = None
    environments: dict[tuple[str, str], str] = field(default_factory=dict)   # (project, env) -> fabula:env
    lock: threading.RLock = field(default_factory=threading.RLock)
    _count: int = 0

    @property
    def bridge(self) -> str:
        return f"fbaws-{self.tag}"

    @property
    def gateway(self) -> str:
        return str(self.vpc[-2])

    @property
    def key(self) -> Path:
        """The operator's SSH key (made with the lab); fabula imports it as the EC2 key pair."""
        return self.tmp / "id_ed25519"

    @property
    def url(self) -> str:
        """Where the ALB's DNS name leads in the lab: the stand-in HAProxy."""
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def env(self) -> dict[str, str]:
        """What the CLI needs to reach the lab's AWS (and nothing real). moto's server is the
        instances' metadata service too: fabula's program on the worker takes its credentials
        there, as an instance's role gives them."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_EC2_METADATA_SERVICE_ENDPOINT": self.endpoint + "/",
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}

    # -- instances as namespaces ----------------------------------------------------------------------
    def boot(self, instance: Any, public_key: str) -> None:
        """Called in moto's run_instances: the instance's namespace, addresses and sshd."""
        with self.lock:
            self._count += 1
            n = self._count
        tags = {t["key"]: t["value"] for t in instance.get_tags()}
        machine = Machine(instance.id, f"fbaws-{self.tag}-{n}", f"fba{self.tag}{n}",
                          [a for a in (instance.private_ip, instance.public_ip) if a], self.tmp / instance.id,
                          tags=tags)
        with self.lock:
            self.machines[instance.id] = machine
        machine.home.mkdir()
        ns = machine.namespace
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", machine.veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", machine.veth, "master", self.bridge, "up")
        sh("ip", "-n", ns, "addr", "add", f"{instance.private_ip}/{self.vpc.prefixlen}", "dev", "eth0")
        if instance.public_ip:   # AWS translates it to the private one; here it is on the interface too
            sh("ip", "-n", ns, "addr", "add", f"{instance.public_ip}/32", "dev", "eth0")
            sh("ip", "route", "replace", f"{instance.public_ip}/32", "dev", self.bridge)
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", self.gateway)
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(machine.home / "host_ed25519"))
        (machine.home / "authorized_keys").write_text(public_key.strip() + "\n")
        (machine.home / "quiet-home").mkdir()
        (machine.home / "sshd_config").write_text("\n".join([
            *(f"ListenAddress {a}:22" for a in machine.addresses),
            f"HostKey {machine.home / 'host_ed25519'}",
            f"PidFile {machine.home / 'sshd.pid'}",
            f"AuthorizedKeysFile {machine.home / 'authorized_keys'}",
            "UsePAM no", "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "MaxSessions 30", "StrictModes no",
            "Subsystem sftp /usr/lib/openssh/sftp-server",
            # root's home is this machine's /root, whose .bashrc is not the tests' (see sshlab.py)
            f"SetEnv HOME={machine.home / 'quiet-home'}", ""]))
        log = (machine.home / "sshd.log").open("ab")
        machine.sshd = subprocess.Popen(["ip", "netns", "exec", ns, "/usr/sbin/sshd", "-D", "-e",
                                         "-f", str(machine.home / "sshd_config")], stdout=log, stderr=log)

    def halt(self, instance_id: str) -> None:
        """A terminated instance: its namespace goes, with every process in it (killed until none
        is left: one may fork while the others are killed)."""
        with self.lock:
            machine = self.machines.pop(instance_id, None)
        if machine is None:
            return

        def killed() -> bool:
            pids = sh("ip", "netns", "pids", machine.namespace, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            return not pids

        try:
            wait_for(killed, 30, interval=0.1, message=f"no process left in {machine.namespace}")
        finally:
            if machine.sshd is not None:
                machine.sshd.wait(10)
            sh("ip", "netns", "del", machine.namespace, check=False)
            for address in machine.addresses[1:]:
                sh("ip", "route", "del", f"{address}/32", check=False)

    def discard_disk(self, instance_id: str, tags: dict[str, str]) -> None:
        """What the instance wrote goes with it, as its volume does on AWS: its server's tree
        under /srv/fabula, and, once the environment has no instance left, its tree and users
        (the namespaces share this machine's files and users)."""
        name, env_tag = tags.get("fabula:server", instance_id), tags.get("fabula:env")
        for tree in Path(SRV).glob(f"*/*/{name}"):
            project, env = tree.parts[-3], tree.parts[-2]
            if f"{project}-{env}" == env_tag:
                shutil.rmtree(tree, ignore_errors=True)
                self.environments[(project, env)] = env_tag
        for (project, env), tag in list(self.environments.items()):
            if tag == env_tag and not any(m.tags.get("fabula:env") == env_tag for m in self.machines.values()):
                self.forget_environment(project, env)

    def forget_environment(self, project: str, env: str) -> None:
        shutil.rmtree(Path(SRV) / project / env, ignore_errors=True)
        with contextlib.suppress(OSError):
            (Path(SRV) / project).rmdir()
        prefix = f"fb-{hashlib.sha256(f'{project}/{env}'.encode()).hexdigest()[:8]}-"
        for user in sh("getent", "passwd").stdout.splitlines():
            name = user.split(":", 1)[0]
            if name.startswith(prefix):
                sh("userdel", name, check=False)
                sh("groupdel", name, check=False)
        self.environments.pop((project, env), None)

    def log(self, line: str) -> None:
        with (self.tmp / "lab.log").open("a") as log:
            log.write(f"{time.time():.1f} {line}\n")

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(service, region_name=REGION, endpoint_url=self.endpoint,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def live_instances(self) -> list[str]:
        pages = self.client("ec2").describe_instances(Filters=[
            {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}])
        return [i["InstanceId"] for r in pages["Reservations"] for i in r["Instances"]]

    def tagged_resources(self, env_tag: str) -> list[str]:
        """What carries the tag `fabula:env=<env_tag>`: the tagging API's resources but instances
        (a terminated one keeps its tags for a while: live_instances says which run), and the
        Auto Scaling groups (which it does not list)."""
        found = [r["ResourceARN"] for r in self.client("resourcegroupstaggingapi").get_resources(
            TagFilters=[{"Key": "fabula:env", "Values": [env_tag]}])["ResourceTagMappingList"]
            if ":instance/" not in r["ResourceARN"]]
        found += [g["AutoScalingGroupName"] for g in self.client("autoscaling").describe_auto_scaling_groups()[
            "AutoScalingGroups"] if {"Key": "fabula:env", "Value": env_tag} in
            [{"Key": t["Key"], "Value": t["Value"]} for t in g.get("Tags", [])]]
        return found

    def processes(self, instance_id: str) -> list[str]:
        machine = self.machines.get(instance_id)
        return sh("ip", "netns", "pids", machine.namespace, check=False).stdout.split() if machine else []


# -- moto, patched ------------------------------------------------------------------------------------

@contextmanager
def _patched(obj: Any, name: str, replacement: Any) -> Iterator[None]:
    original = getattr(obj, name)
    setattr(obj, name, replacement)
    try:
        yield
    finally:
        setattr(obj, name, original)


def _instances_as_namespaces(lab: AwsLab) -> ExitStack:
    from moto.ec2.models.instances import InstanceBackend

    run_instances, terminate_instances = InstanceBackend.run_instances, InstanceBackend.terminate_instances

    def run(backend: Any, *args: Any, **kwargs: Any) -> Any:
        reservation = run_instances(backend, *args, **kwargs)
        for instance in reservation.instances:
            pair = backend.key_pairs.get(instance.key_name) if instance.key_name else None
            lab.boot(instance, pair.material_public.decode() if pair else "")
        return reservation

    def terminate(backend: Any, instance_ids: list[str]) -> Any:
        found = terminate_instances(backend, instance_ids)
        for instance_id in instance_ids:
            tags = {t["key"]: t["value"] for t in backend.describe_tags(filters={"resource-id": [instance_id]})}
            try:
                lab.halt(instance_id)
                lab.discard_disk(instance_id, tags)
            except Exception as exc:   # AWS's call succeeded; the lab's clean-up retries at its end
                lab.log(f"halt {instance_id}: {exc!r}")
        return found

    stack = ExitStack()
    stack.enter_context(_patched(InstanceBackend, "run_instances", run))
    stack.enter_context(_patched(InstanceBackend, "terminate_instances", terminate))
    return stack


def _real_target_health(lab: AwsLab) -> ExitStack:
    """moto's target health replaced by the prober's findings, and deregistration made to drain."""
    from moto.elbv2.models import FakeHealthStatus, FakeTargetGroup

    health_for, deregister = FakeTargetGroup.health_for, FakeTargetGroup.deregister

    def real_health(group: Any, target: dict[str, Any], ec2_backend: Any) -> Any:
        status = health_for(group, target, ec2_backend)
        with lab.lock:
            found = lab.health.get((group.arn, target["Id"]))
        if status.status == "healthy":
            state = found.state if found else "initial"
            return FakeHealthStatus(target["Id"], status.port, group.health_check_port, state,
                                    None if state == "healthy" else "Elb.RegistrationInProgress")
        if status.status == "unused" and found is not None and found.state == "draining":
            return FakeHealthStatus(target["Id"], status.port, group.health_check_port, "draining",
                                    "Target.DeregistrationInProgress")
        return status

    def draining(group: Any, targets: list[dict[str, Any]]) -> None:
        deregister(group, targets)
        delay = float(group.attributes.get("deregistration_delay.timeout_seconds", 300))
        drained = []
        with lab.lock:
            for target in targets:
                found = lab.health.get((group.arn, target["Id"]))
                if found is not None and found.state == "healthy":
                    now = time.monotonic()
                    found.state, found.draining_since, found.draining_until = "draining", now, now + delay
                    drained.append(target["Id"])
                else:
                    lab.health.pop((group.arn, target["Id"]), None)
        for target_id in drained:   # no new request from now on, as an ALB's deregistration
            if lab.alb is not None:
                lab.alb.drain(target_id)

    stack = ExitStack()
    stack.enter_context(_patched(FakeTargetGroup, "health_for", real_health))
    stack.enter_context(_patched(FakeTargetGroup, "deregister", draining))
    return stack


# -- the prober and the stand-in ALB ------------------------------------------------------------------

def _check(address: str, port: int) -> bool:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    # no proxy from the environment: the target is on the lab's bridge
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(f"https://{address}:{port}/healthcheck.html", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class StandInAlb:
    """HAProxy with SLOTS server slots, each given a target's address and state at run time."""

    def __init__(self, lab: AwsLab):
        self.lab = lab
        self.socket = lab.tmp / "alb.sock"
        self.slots: dict[str, int] = {}      # target id -> slot
        self.process: subprocess.Popen | None = None
        self.lock = threading.Lock()         # the prober's and moto's threads both route
        self.hsts: str | None = None

    def start(self) -> None:
        pair = pki.self_signed("fabula-aws-lab", ["localhost"])
        pem = self.lab.tmp / "alb.pem"
        pem.write_bytes(pair.cert_pem + pair.key_pem)
        pem.chmod(0o600)
        config = self.lab.tmp / "alb.cfg"
        config.write_text(f"""global
    stats socket {self.socket} mode 600 level admin
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 120s
    option http-server-close
frontend https
    bind 127.0.0.1:{self.lab.https_port} ssl crt {pem}
    # the HTTPS listener's HSTS attribute, once the prober has read it
    http-after-response set-header Strict-Transport-Security "%[var(proc.hsts)]" if {{ var(proc.hsts) -m found }}
    default_backend targets
frontend http
    bind 127.0.0.1:{self.lab.http_port}
    http-request redirect location https://%[req.hdr(host),field(1,:)]:{self.lab.https_port}%[capture.req.uri] code 301
backend targets
    server-template t 1-{SLOTS} 0.0.0.0:443 ssl verify none init-addr none disabled
""")
        log = (self.lab.tmp / "alb.log").open("ab")
        self.process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=log, stderr=log)
        wait_for(lambda: self.socket.exists(), 15, interval=0.05, message="the stand-in ALB's socket")

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(self.socket))
            conn.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def in_flight(self, target_id: str) -> int:
        slot = self.slots.get(target_id)
        if slot is None:
            return 0
        for line in self.command("show stat").splitlines():
            fields = line.split(",")
            if fields[:2] == ["targets", f"t{slot}"]:
                return int(fields[4] or 0)   # scur
        return 0

    def route(self, wanted: dict[str, tuple[str, int, str]]) -> None:
        """`wanted`: target id -> (address, port, "ready" | "drain"); every other slot in maint."""
        with self.lock:
            self._route(wanted)

    def _route(self, wanted: dict[str, tuple[str, int, str]]) -> None:
        with self.lab.lock:   # deregistered since the prober looked: it stays drained
            draining = {t for (_, t), h in self.lab.health.items() if h.state == "draining"}
        wanted = {t: (a, p, "drain" if t in draining else s) for t, (a, p, s) in wanted.items()}
        for target_id in [t for t in self.slots if t not in wanted]:
            self.command(f"set server targets/t{self.slots.pop(target_id)} state maint")
        for target_id, (address, port, state) in wanted.items():
            if target_id not in self.slots:
                free = sorted(set(range(1, SLOTS + 1)) - set(self.slots.values()))
                self.slots[target_id] = free[0]
                self.command(f"set server targets/t{free[0]} addr {address} port {port}")
            self.command(f"set server targets/t{self.slots[target_id]} state {state}")

    def follow_listener(self, backend: Any) -> None:
        """The header the HTTPS listener's attributes ask the ALB to add to every response."""
        value = next((listener.attributes.get(HSTS_ATTRIBUTE) for balancer in list(backend.load_balancers.values())
                      for listener in list(balancer.listeners.values()) if listener.protocol == "HTTPS"), None)
        if value is not None and value != self.hsts:
            if any(c not in "abcdefghijklmnopqrstuvwxyz0123456789-=; " for c in value):
                raise ValueError(f"an HSTS value the stand-in will not pass to HAProxy: {value!r}")
            self.command(f"experimental-mode on; set var proc.hsts str({value})")   # HAProxy 2.6: experimental
            self.hsts = value

    def drain(self, target_id: str) -> None:
        with self.lock:
            if target_id in self.slots:
                self.command(f"set server targets/t{self.slots[target_id]} state drain")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)


def _probe_forever(lab: AwsLab, alb: StandInAlb, stop: threading.Event) -> None:
    from moto.elbv2.models import elbv2_backends

    ticks = 0
    while not stop.wait(PROBE_INTERVAL):
        ticks += 1
        try:
            _probe_once(lab, alb, elbv2_backends[ACCOUNT][REGION])
            if ticks % 2 == 0:
                _enforce_security_groups(lab)
        except Exception as exc:   # a failed tick must not end the prober: the next one retries
            lab.log(f"prober: {exc!r}")


# -- security groups as each namespace's nftables ---------------------------------------------------

def _enforce_security_groups(lab: AwsLab) -> None:
    """Each instance's security groups as an nftables table in its namespace (ingress only:
    AWS's default egress admits everything). A rule naming a group admits its instances'
    private addresses; the load balancer's groups stand for the lab's gateway, where the
    stand-in ALB and the health checks come from. Within a second of any change."""
    ec2, elbv2 = lab.client("ec2"), lab.client("elbv2")
    running = [i for r in ec2.describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["running"]}])[
        "Reservations"] for i in r["Instances"]]
    members: dict[str, set[str]] = {}
    for instance in running:
        for group in instance.get("SecurityGroups", []):
            members.setdefault(group["GroupId"], set()).add(instance["PrivateIpAddress"])
    for balancer in elbv2.describe_load_balancers()["LoadBalancers"]:
        for group_id in balancer.get("SecurityGroups", []):
            members.setdefault(group_id, set()).add(lab.gateway)
    groups = {g["GroupId"]: g for g in ec2.describe_security_groups()["SecurityGroups"]}
    for instance in running:
        machine = lab.machines.get(instance["InstanceId"])
        if machine is None:
            continue
        rules = [rule for group in instance.get("SecurityGroups", []) if group["GroupId"] in groups
                 for rule in _nft_rules(groups[group["GroupId"]], members)]
        table = "\n".join(["table inet fbawslab {", "  chain input {",
                           "    type filter hook input priority 0; policy drop;",
                           "    iif lo accept", "    ct state established,related accept",
                           *(f"    {r}" for r in sorted(set(rules))), "  }", "}", ""])
        if table != machine.firewall:
            subprocess.run(["ip", "netns", "exec", machine.namespace, "nft", "-f", "-"], check=True, text=True,
                           input=f"table inet fbawslab {{}}\ndelete table inet fbawslab\n{table}",
                           capture_output=True)
            machine.firewall = table


def _nft_rules(group: dict[str, Any], members: dict[str, set[str]]) -> list[str]:
    rules = []
    for permission in group.get("IpPermissions", []):
        sources = {r["CidrIp"] for r in permission.get("IpRanges", [])}
        for pair in permission.get("UserIdGroupPairs", []):
            sources |= members.get(pair["GroupId"], set())
        if not sources:
            continue
        saddr = f"ip saddr {{ {', '.join(sorted(sources))} }}"
        protocol = permission["IpProtocol"]
        if protocol == "-1":
            rules.append(f"{saddr} accept")
        elif protocol in ("tcp", "udp", "6", "17"):
            name = {"6": "tcp", "17": "udp"}.get(protocol, protocol)
            low, high = permission.get("FromPort", 0), permission.get("ToPort", 65535)
            ports = str(low) if low == high else f"{low}-{high}"
            rules.append(f"{saddr} {name} dport {ports} accept")
    return rules


def _probe_once(lab: AwsLab, alb: StandInAlb, backend: Any) -> None:
    wanted: dict[str, tuple[str, int, str]] = {}
    for group in list(backend.target_groups.values()):
        registered = dict(group.targets)
        for target_id, target in registered.items():
            instance = group.ec2_backend.get_instance_by_id(target_id)
            if instance is None:
                continue
            port = int(target.get("Port") or group.port)
            ok = _check(instance.private_ip, port)
            with lab.lock:
                if target_id not in group.targets:   # deregistered meanwhile: draining() has it
                    continue
                found = lab.health.setdefault((group.arn, target_id), TargetHealth())
                found.passes, found.fails = (found.passes + 1, 0) if ok else (0, found.fails + 1)
                if found.passes >= int(group.healthy_threshold_count):
                    found.state = "healthy"
                elif found.fails >= int(group.unhealthy_threshold_count):
                    found.state = "unhealthy"
                if found.state == "healthy":
                    wanted[target_id] = (instance.private_ip, port, "ready")
        with lab.lock:
            draining = {key: h for key, h in lab.health.items() if key[0] == group.arn and h.state == "draining"}
        for (_, target_id), found in draining.items():
            # AWS ends a deregistration early once the target has nothing in flight (looked at
            # once the stand-in has stopped sending it requests: a tick after)
            now = time.monotonic()
            if now > found.draining_until or (now > found.draining_since + PROBE_INTERVAL
                                               and alb.in_flight(target_id) == 0):
                with lab.lock:
                    lab.health.pop((group.arn, target_id), None)
            else:
                instance = group.ec2_backend.get_instance_by_id(target_id)
                wanted[target_id] = (instance.private_ip, int(group.port), "drain")
    alb.route(wanted)
    alb.follow_listener(backend)


# -- the lab ------------------------------------------------------------------------------------------

@contextmanager
def aws_lab() -> Iterator[AwsLab]:
    if os.geteuid() != 0:
        pytest.skip("the aws end-to-end tests need root (network namespaces)")
    for program in ("/usr/sbin/sshd", "/usr/sbin/haproxy"):
        if not Path(program).exists():
            pytest.skip(f"{program} is not installed (make setup)")
    from moto.server import ThreadedMotoServer

    if _ACTIVE:
        # moto's backends are this process's, and the lab patches them: two labs would both
        # boot every instance (e.g. the acceptance suite's environment still up during another
        # module's): its fixture must end first
        raise RuntimeError(f"an AWS lab ({_ACTIVE[0]}) is still running in this process: one at a time")
    tag = secrets.token_hex(3)
    tmp = Path(tempfile.mkdtemp(prefix=f"fbaws-{tag}-", dir="/var/tmp"))
    tmp.chmod(0o755)
    lab = AwsLab(tag, tmp, free_vpc())
    lab.https_port, lab.http_port = free_ports(2)
    stop = threading.Event()
    with ExitStack() as stack:
        try:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"fbaws-{tag}", "-f", str(lab.key))
            sh("ip", "link", "add", lab.bridge, "type", "bridge")
            sh("ip", "addr", "add", f"{lab.gateway}/{lab.vpc.prefixlen}", "dev", lab.bridge)
            sh("ip", "link", "set", lab.bridge, "up")
            port = free_ports(1, lab.gateway)[0]
            server = ThreadedMotoServer(ip_address=lab.gateway, port=port, verbose=False)
            server.start()
            stack.callback(server.stop)
            lab.endpoint = f"http://{lab.gateway}:{port}"
            stack.enter_context(_instances_as_namespaces(lab))
            stack.enter_context(_real_target_health(lab))
            alb = StandInAlb(lab)
            alb.start()
            lab.alb = alb
            stack.callback(alb.stop)
            prober = threading.Thread(target=_probe_forever, args=(lab, alb, stop), daemon=True)
            prober.start()
            stack.callback(prober.join, 10)
            stack.callback(stop.set)
            _ACTIVE.append(tag)
            stack.callback(_ACTIVE.remove, tag)
            saved = {name: os.environ.get(name) for name in lab.env}
            os.environ.update(lab.env)
            stack.callback(_restore, saved)
            yield lab
        finally:
            stack.close()
            for instance_id, machine in list(lab.machines.items()):
                lab.halt(instance_id)
                lab.discard_disk(instance_id, machine.tags)
            for project, env in list(lab.environments):
                lab.forget_environment(project, env)
            sh("ip", "link", "del", lab.bridge, check=False)
            if os.environ.get("FABULA_KEEP_LAB") != "1":   # its logs, to read after a failure
                shutil.rmtree(tmp, ignore_errors=True)


def _restore(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def aws_keys(lab: AwsLab) -> str:
    """An aws environment's keys as fabula.yml lines, in the lab's VPC and region, reached with
    the lab's key from this machine (the lab's gateway: its address in `admin_sources`)."""
    ami = _image(lab)
    return "\n".join([
        f"    aws: {{region: {REGION}, vpc: {{cidr: {lab.vpc}}}, ami: {ami}, state_bucket: fabula-lab-{lab.tag}}}",
        f"    ssh: {{user: root, key: {lab.key}, known_hosts: {lab.tmp / 'known_hosts'}}}",
        f"    admin_sources: [{lab.gateway}/32]",
        ""])


def _image(lab: AwsLab) -> str:
    images = lab.client("ec2").describe_images(Owners=["amazon"])["Images"]
    return str(next(i for i in images if i.get("Architecture", "x86_64") == "x86_64")["ImageId"])
