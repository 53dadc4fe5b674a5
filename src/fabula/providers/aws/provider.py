"""`provider: aws`: the control plane of controlplane.py, the fixed roles' instances of
instances.py reached over the ssh provider's transport (access.py) and prepared by its code
(ssh/preparation.py), the ALB and the Auto Scaling group as the LoadBalancer and the WebGroup
(web.py), and the S3 state bucket as the team's shared store (store.py)."""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from fabula import machine_users, pki, program_home, secrets
from fabula.accounts import Accounts
from fabula.config import EnvironmentConfig, SshConfig
from fabula.errors import FabulaError, PrerequisiteError
from fabula.providers.aws import controller_role, instances, teardown
from fabula.providers.aws import group as web_group
from fabula.providers.aws.access import Access, SshAccess
from fabula.providers.aws.cloud import AwsError, Cloud, translate
from fabula.providers.aws.controlplane import ControlPlane, ensure_control_plane, ensure_web_tier
from fabula.providers.aws.hostkeys import RECORD, KnownHosts
from fabula.providers.aws.instances import FIXED_ROLES, Instance, ssh_address
from fabula.providers.aws.network import Network, ensure_network, fence, server_groups
from fabula.providers.aws.statebucket import StateBucket
from fabula.providers.aws.store import FILES, BucketStore
from fabula.providers.aws.web import AlbLoadBalancer, AwsWebGroup
from fabula.providers.base import (
    BuildPlace,
    EgressRule,
    Host,
    IngressRule,
    ProgramHome,
    Provider,
    SharedStore,
)
from fabula.providers.ssh.preparation import Preparation
from fabula.providers.ssh.scripts import DEBIAN_VERSION, this_machine
from fabula.state import EnvPaths, EnvState, write_atomically

AddressChoice = Callable[[Instance, "str | None"], str]
RoleRules = Mapping[str, Sequence[IngressRule]]
SHIPPED_KEY = "ssh-key"
# where AWS is, when not at its public endpoints: passed on to fabula's program on the worker
ENDPOINTS = ("AWS_ENDPOINT_URL", "AWS_EC2_METADATA_SERVICE_ENDPOINT")


METADATA_TABLE = "fabula-metadata"
METADATA_GUARD = f"""# written by fabula: the instance's metadata service (its role's credentials) is root's only
table inet {METADATA_TABLE} {{}}
flush table inet {METADATA_TABLE}
table inet {METADATA_TABLE} {{
  chain output {{
    type filter hook output priority 0; policy accept;
    ip daddr 169.254.169.254 meta skuid != 0 reject comment "the instance metadata: root's only"
  }}
}}
"""


def private_address(instance: Instance, jump: str | None) -> str:
    return instance.private_ip


class AwsProvider(Provider):
    name = "aws"
    load_balancer: AlbLoadBalancer

    def __init__(self, paths: EnvPaths, env: EnvironmentConfig, state: EnvState, euid: int = 0, *,
                 role_rules: RoleRules, session: Any = None, access: Access | None = None,
                 address: AddressChoice = ssh_address, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, controller_home: Path | None = None):
        """`role_rules`: each role's ingress rules, for the security groups (roles are above the
        providers); `session` a boto3 session (default: the environment's credentials);
        `access` how instances are reached (default: SSH); `address` which of an instance's
        addresses fabula connects to (default: ssh_address); `sleep` and `clock` pace the waits.
        `controller_home`: this is fabula's program on the worker (program_home), in that folder:
        inside the VPC, it reaches instances at their private addresses, with no jump host, with
        known_hosts of its own."""
        assert env.aws is not None  # EnvironmentConfig requires the section with `provider: aws`
        self.paths, self.env, self.state, self.aws = paths, env, state, env.aws
        self.ssh: SshConfig = env.ssh or SshConfig()
        self.controller_home = controller_home
        known_hosts = self.ssh.known_hosts or Path.home() / ".ssh" / "known_hosts"
        if controller_home is not None:
            self.ssh = self.ssh.model_copy(update={"jump": None})
            address, known_hosts = private_address, controller_home / "known_hosts"
        self.role_rules, self.address, self.clock = role_rules, address, clock
        self.cloud = Cloud.open(paths.project, paths.env, self.aws.region, session=session, sleep=sleep)
        self.accounts = Accounts(paths.tag)
        # the security groups are the firewall; the boot unit loads the instance's metadata guard
        self.preparation = Preparation(paths.project, paths.env, paths.tag, self.accounts)
        self.known_hosts = KnownHosts(known_hosts, paths.env_dir / RECORD)
        self._access = access
        self.load_balancer = AlbLoadBalancer(self.cloud, env.lb.https_port)
        self.store = BucketStore(StateBucket(self.cloud, self.aws.state_bucket))
        self._plane: ControlPlane | None = None
        self._network: Network | None = None
        self._instances: dict[str, Instance] = {}
        self._key_name: str | None = None
        self._profile: str | None = None   # the worker's instance profile, once ensure_network made it

    @property
    def access(self) -> Access:
        if self._access is None:
            self._access = SshAccess(self.ssh, self._key_file(), self.known_hosts.path)
        return self._access

    def close(self) -> None:
        if isinstance(self._access, SshAccess):
            self._access.close()

    def shared_store(self) -> SharedStore:
        return self.store

    def web_group(self, ctx: Any) -> AwsWebGroup:
        return AwsWebGroup(self.cloud, self.load_balancer, launch_from=self._launch_from, forget=self._forget,
                           clock=self.clock)

    def _launch_from(self, release: str) -> bool:
        """The release's launch template and the group (made, or pointed at it): a create's web
        tier, a deploy's and a rollback's first step."""
        if self._plane is not None:
            target_group_arn, load_balancer_arn = self._plane.target_group_arn, self._plane.load_balancer_arn
        else:
            target_group_arn, load_balancer_arn = self.load_balancer.target_group_arn(), self.load_balancer.arn()
        template, _, _ = ensure_web_tier(self.cloud, self.env, release=release, network=self._subnets(),
                                         security_groups=self._groups(), target_group_arn=target_group_arn,
                                         load_balancer_arn=load_balancer_arn, key_name=self._key_pair())
        return web_group.point_group(self.cloud, template)

    def _forget(self, instance: Instance) -> None:
        self.known_hosts.forget([self.address(instance, self.ssh.jump)])
        self._instances.pop(instance.id, None)

    # -- checks -------------------------------------------------------------------------------------
    def check_prerequisites(self) -> None:
        if shutil.which("ssh") is None:
            raise PrerequisiteError("the OpenSSH client (`ssh`) is missing: `fabula exec` and `logs -f` use it",
                                    "run `apt-get install openssh-client`")
        # no call at all without credentials: botocore would search the instance metadata for a while
        if self.cloud.session.get_credentials() is None:
            raise PrerequisiteError(f"no AWS credentials for region {self.aws.region}: fabula found none in the "
                                    "environment, ~/.aws or an instance role",
                                    "set AWS_PROFILE (or run `aws configure`, or `aws sso login`), then run the "
                                    "command again")
        try:
            self.cloud.sts.get_caller_identity()
        except (ClientError, BotoCoreError) as exc:
            error = translate(exc, self.cloud.counter)
            raise PrerequisiteError(f"the AWS credentials do not work: {error.message}", error.hint) from None

    def build_place(self) -> BuildPlace:
        """Releases are built here: the instances run Debian 12 of the instance types' architecture."""
        here = this_machine()
        wanted = ("debian", DEBIAN_VERSION, self.aws.instance_types.architecture())
        if (here.distribution, here.version, here.architecture) != wanted:
            raise FabulaError(f"releases are built on this machine ({here.describe()}), but the instances run "
                              f"Debian {DEBIAN_VERSION} on {wanted[2]}: a virtualenv built here would not "
                              "run there", "run fabula from a Debian 12 machine of the instances' architecture "
                              "(e.g. the worker instance)")
        return BuildPlace(f"this machine: it matches the instances ({here.describe()})")

    # -- the control plane -----------------------------------------------------------------------------
    def allocate_subnet(self) -> str:
        return ""   # the VPC's subnets are AWS's to give (ensure_network)

    def _key_file(self) -> Path:
        if self.ssh.key is not None:
            return self.controller_home / SHIPPED_KEY if self.controller_home is not None else self.ssh.key
        return secrets.ssh_key(self.paths)   # the environment's own: in the shared files

    def _public_key(self) -> str:
        public = self._key_file().with_name(self._key_file().name + ".pub")
        try:
            return public.read_text().strip()
        except OSError as exc:
            raise FabulaError(f"ssh.key: cannot read its public half {public}: {exc.strerror}",
                              f"make it with `ssh-keygen -y -f {self._key_file()} > {public}`") from None

    def _certificate(self) -> tuple[bytes, bytes] | None:
        """What to import into ACM: lb.certificate and lb.key, or the environment's self-signed
        one (made as the local provider's load balancer makes its own, again within 30 days of
        its expiry); None when aws.certificate_arn names one."""
        if self.aws.certificate_arn is not None:
            return None
        lb = self.env.lb
        if lb.certificate is not None and lb.key is not None:
            try:
                return lb.certificate.read_bytes(), lb.key.read_bytes()
            except OSError as exc:
                raise FabulaError(f"lb.certificate/lb.key: cannot read {exc.filename}: {exc.strerror}",
                                  "point lb.certificate and lb.key at readable PEM files") from None
        # in the pki folder: a team's shared store carries it, so every operator imports the same
        cert_file, key_file = self.paths.pki_dir / "lb-cert.pem", self.paths.pki_dir / "lb-key.pem"
        names = [*self.env.domains, "localhost"]
        existing = cert_file.read_bytes() if cert_file.is_file() and key_file.is_file() else None
        if existing is None or pki.needs_renewal(existing, names, max_lifetime=pki.LB_VALIDITY):
            pair = pki.self_signed(self.cloud.tag_value, names)
            self.paths.make_env_dir()
            self.paths.pki_dir.mkdir(mode=0o700, exist_ok=True)
            write_atomically(key_file, pair.key_pem, mode=0o600)
            write_atomically(cert_file, pair.cert_pem, mode=0o644)
        return cert_file.read_bytes(), key_file.read_bytes()

    def ensure_network(self) -> None:
        values = secrets.load_or_create(self.paths)
        self._plane = ensure_control_plane(
            self.cloud, self.env, role_rules=self.role_rules, certificate=self._certificate(),
            secrets={name: getattr(values, name) for name in secrets.NAMES}, release=self.state.release,
            key_name=self._key_pair())
        self._network = self._plane.network
        self._profile = controller_role.ensure_instance_profile(self.cloud, self.aws.state_bucket)
        # the Auto Scaling group's instances get addresses of AWS's choosing, anywhere in the VPC:
        # what admits the app servers (pg_hba: roles/postgres.client_networks) is its range, as
        # the local provider's subnet; the security groups are what admits only web and worker
        if self.state.subnet != self._network.cidr:
            self.state.subnet = self._network.cidr
            self.state.save(self.paths)

    def _key_pair(self) -> str:
        """The environment's EC2 key pair, ensured once per command."""
        if self._key_name is None:
            self._key_name = instances.ensure_key_pair(self.cloud, self._public_key())
        return self._key_name

    def _groups(self) -> dict[str, str]:
        """Each group kind's id: from this command's ensure_network, else found by tag."""
        if self._plane is not None:
            return self._plane.security_groups
        found = self.cloud.ec2.describe_security_groups(Filters=self.cloud.filters())["SecurityGroups"]
        kinds = {t["Value"]: g["GroupId"] for g in found for t in g.get("Tags", []) if t["Key"] == "fabula:group"}
        if "common" not in kinds:
            raise FabulaError(f"environment {self.cloud.tag_value} has no security groups on AWS",
                              "run `fabula create` first")
        return kinds

    def _subnets(self) -> Network:
        if self._network is None:
            self._network = ensure_network(self.cloud, self.aws.vpc)   # found again: it makes nothing new
        return self._network

    # -- the fixed roles' instances -----------------------------------------------------------------
    def ensure_accounts(self) -> Accounts:
        """The environment's users on the instances that exist (a new one gets them as it is made)."""
        for name in self.list_servers():
            self.preparation.ensure_accounts(self.host(name))
        return self.accounts

    def _find(self, name: str) -> Instance | None:
        found = instances.find(self.cloud, name)
        if len(found) > 1:
            raise AwsError(f"{len(found)} instances are tagged as server {name} of {self.cloud.tag_value}: "
                           f"{', '.join(i.id for i in found)}",
                           "terminate the one fabula does not use (fabula never makes two)")
        if not found and name.startswith("i-"):   # a web group's instance: named by its id
            member = instances.find_member(self.cloud, name)
            found = [member] if member is not None else []
        if found:
            self._instances[name] = found[0]
        return found[0] if found else None

    def _host(self, instance: Instance, name: str, role: str) -> Host:
        host = self.access.host(name, role, self.address(instance, self.ssh.jump), instance.private_ip,
                                self.preparation.env_root / name, self.accounts)
        # the instance's supervisord runs under its systemd unit, as on the ssh provider's hosts
        host.start_supervisord = partial(self.preparation.start_supervisord, host)
        return host

    def ensure_server(self, name: str, role: str) -> Host:
        instance = self._find(name)
        if role not in FIXED_ROLES and (instance is None or instance.role != role):
            # a web server is the group's to launch: fabula only prepares one the group launched
            raise FabulaError(f"{name}: the web servers of an aws environment are its Auto Scaling group's, not "
                              "instances fabula makes one by one",
                              "set the web group's size with `autoscaling:` (or `fabula scale`)")
        made = instance is None
        if instance is None:
            network, groups = self._subnets(), self._groups()
            image = web_group.resolve_image(self.cloud, self.aws.ami, self.aws.instance_types.architecture())
            instance = instances.launch(
                self.cloud, name=name, role=role, image=image,
                instance_type=self.aws.instance_types.by_role()[role],
                subnet_id=instances.choose_subnet(role, network, instances.find(self.cloud)),
                security_group_ids=[groups[kind] for kind in server_groups(role)],
                key_name=self._key_pair(), instance_profile=self._worker_profile(role))
        elif role in FIXED_ROLES:
            instances.set_role(self.cloud, instance, role)
            profile = self._worker_profile(role)
            if profile is not None:
                controller_role.attach(self.cloud, instance.id, profile)
        if instance.state != "running":
            instance = instances.wait_running(self.cloud, instance.id)
        self._instances[name] = instance
        record = self.state.servers[name]
        if record.address != instance.private_ip:
            record.address = instance.private_ip
            self.state.save(self.paths)
        ssh_at = self.address(instance, self.ssh.jump)
        if made or not self.known_hosts.has(ssh_at):
            self.known_hosts.add(ssh_at, self.access.host_key(name, ssh_at))
        host = self._host(instance, name, role)
        self.preparation.ensure_accounts(host)
        self.preparation.make_tree(host)
        return host

    def _worker_profile(self, role: str) -> str | None:
        """The worker's instance profile (fabula's program runs there); none for other roles."""
        if role != "worker":
            return None
        if self._profile is None:
            self._profile = controller_role.ensure_instance_profile(self.cloud, self.aws.state_bucket)
        return self._profile

    def host(self, name: str) -> Host:
        record = self.state.servers.get(name)
        instance = self._instances.get(name) or self._find(name)
        if instance is None:
            raise FabulaError(f"server {name} has no instance on AWS", "run `fabula create` to make it again")
        return self._host(instance, name, record.role if record else instance.role)

    def server_exists(self, name: str) -> bool:
        return self._find(name) is not None

    def list_servers(self) -> list[str]:
        """The instances fabula made for the inventory (those the web group launched carry no
        server name: they are the group's)."""
        return sorted({i.name for i in instances.find(self.cloud) if i.role in FIXED_ROLES})

    def prepare_host(self, host: Host, packages: tuple[str, ...]) -> None:
        self.preparation.install(host, ("nftables", *packages))   # (the metadata guard)

    def platform_host(self) -> Host:
        workers = self.state.by_role("worker")
        if not workers:
            raise FabulaError("an aws environment runs fabula's programs on its worker, and it has none",
                              "set `servers: {worker: 1}` in fabula.yml and run `fabula create`")
        return self.host(workers[0].name)

    def program_home(self, config: Path, state_root: Path, python: str) -> ProgramHome:
        """fabula shipped to the worker (program_home.ship), its program reaching AWS as this
        machine does: the instance's role on AWS; where AWS_ENDPOINT_URL points elsewhere (a
        stand-in for AWS: moto), there too, and to its instance metadata (credentials)."""
        host = self.platform_host()
        files = {SHIPPED_KEY: self.ssh.key.read_bytes()} if self.ssh.key is not None else {}
        # the instances' keys as this machine trusts them, at the addresses the worker reaches them
        # at (it trusts the group's new instances on first contact, as create does)
        lines = []
        for name in sorted(set(self.list_servers()) | set(self.state.servers)):   # the group's members too
            instance = self._instances.get(name) or self._find(name)
            if instance is not None:   # (named as ensure_server records them)
                keys = self.known_hosts.keys(self.address(instance, self.ssh.jump))
                lines += [f"{instance.private_ip} {key}\n" for key in keys]
        files["known_hosts"] = "".join(lines).encode()
        home = program_home.ship(host, root=self.paths.root, python=python, config=config,
                                 project=self.paths.project, env=self.paths.env, files=files)
        # the releases the worker has are those the program converges new web servers with
        env_dir = PurePosixPath(home.state_root, self.paths.project, self.paths.env)
        host.check(["ln", "-sfn", str(host.path("releases")), str(env_dir / "releases")])
        endpoints = {name: os.environ[name] for name in ENDPOINTS if os.environ.get(name)}
        return replace(home, environment={**home.environment, **endpoints})

    def apply_firewall(self, host: Host, rules: list[IngressRule | EgressRule]) -> bool:
        """The security groups are the firewall (their rules were made from every role's by
        ensure_network): the instance is in its role's groups, or, fenced (awaiting a rebuild),
        in the group that admits nothing but SSH. Egress is not limited on AWS."""
        instance = self._instances.get(host.name) or self._find(host.name)
        if instance is None:
            raise FabulaError(f"server {host.name} has no instance on AWS", "run `fabula create` to make it again")
        groups = self._groups()
        record = self.state.servers.get(host.name)
        if record is not None and record.rebuild:
            if instance.security_groups == (groups["fenced"],):
                return False
            fence(self.cloud, instance.id, groups)
            changed = True
        else:
            changed = instances.set_groups(self.cloud, instance, [groups[k] for k in server_groups(host.role)])
        if changed:
            self._instances.pop(host.name, None)   # its groups changed: described again when asked
        return self._guard_metadata(host) or changed

    def _guard_metadata(self, host: Host) -> bool:
        """The instance's metadata service for root only: fabula's program on the worker takes
        the instance role's credentials there, and the app (Celery runs there) must not. Loaded
        now and, by the server's unit, at boot."""
        path = host.path("etc", "firewall.confirmed")
        changed = host.put_file(path, METADATA_GUARD, mode=0o600)
        if changed or not host.run(["nft", "list", "table", "inet", METADATA_TABLE]).ok:
            host.check(["nft", "-f", str(path)])
            return True
        return False

    def remove_server(self, name: str, drained: bool = False) -> None:
        member = instances.find_member(self.cloud, name) if name.startswith("i-") else None
        if member is not None:   # the group's: terminated by it, or it would launch a replacement
            self.web_group(None).terminate(name)
            return
        found = instances.find(self.cloud, name)
        instances.terminate(self.cloud, [i.id for i in found])
        self.known_hosts.forget([self.address(i, self.ssh.jump) for i in found])
        self._instances.pop(name, None)

    def activity(self) -> str:
        changes = self.cloud.counter.changes()
        # the state bucket's objects (the lock, the shared files) are written by every command
        shared = sum(n for call, n in changes.items() if call in ("s3.PutObject", "s3.DeleteObject"))
        made = sum(changes.values()) - shared
        return (f"{self.cloud.counter.total()} AWS API calls: {made or 'none'} changed a resource, "
                f"{shared} wrote the shared state and lock")

    def destroy(self) -> list[str]:
        removed = teardown.destroy(self.cloud)
        removed += [f"known_hosts entry {name}" for name in self.known_hosts.forget()]
        # the shared files (a later create of the same name starts afresh); the lock goes with release()
        if self.store.forget():
            removed.append(f"s3://{self.aws.state_bucket}/{self.store.bucket.key(FILES)}")
        # the users its releases were built as, on this machine
        removed += [f"user {name}" for name in machine_users.remove(self.accounts, self.paths.root / ".accounts.lock")]
        return removed
