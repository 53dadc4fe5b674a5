"""What every role is: the packages it needs, who may reach it, and how it converges a server."""
from __future__ import annotations

from pathlib import PurePosixPath

from fabula.context import Context
from fabula.errors import FabulaError
from fabula.pki import certificate_names
from fabula.providers.base import EgressRule, Host, IngressRule, poll


class Role:
    name: str = ""
    packages: tuple[str, ...] = ()
    services: tuple[str, ...] = ()   # supervisor programs, as shown by `describe`

    def ingress(self, ctx: Context) -> list[IngressRule]:
        return []

    def egress(self, ctx: Context) -> list[EgressRule]:
        """The connections the role's servers may open (besides replies and their own loopback)."""
        return []

    def services_for(self, ctx: Context) -> tuple[str, ...]:
        return self.services

    def converge(self, ctx: Context, host: Host) -> None:
        raise NotImplementedError


def ensure_certificate(ctx: Context, host: Host, cert: PurePosixPath, key: PurePosixPath,
                       owner: str) -> bool:
    """The server's certificate from the environment's CA, for its address and its internal DNS
    name (the name HAProxy verifies), issued again when its names differ, when it expires within
    30 days, or when it is not this CA's or not for the key beside it."""
    ca = ctx.require_ca()
    names = [host.address, ca.server_name(host.name)]
    current, current_key = host.read_file(cert), host.read_file(key)
    if (current and current_key and sorted(certificate_names(current)) == sorted(names)
            and ca.is_current(current, current_key)):
        changed = host.put_file(cert, current, mode=0o644, owner=owner)
        return host.put_file(key, current_key, mode=0o600, owner=owner) or changed
    pair = ca.issue(names[1], names)
    host.put_file(cert, pair.cert_pem, mode=0o644, owner=owner)
    host.put_file(key, pair.key_pem, mode=0o600, owner=owner)
    return True


def wait_port(host: Host, address: str, port: int, timeout: float = 60, what: str = "") -> None:
    """Poll until something accepts TCP connections on address:port from inside the server."""
    probe = ["bash", "-c", f"exec 3<>/dev/tcp/{address}/{port}"]
    if not poll(lambda: host.run(probe, timeout=5).ok, timeout, interval=0.2):
        raise FabulaError(f"{host.name}: {what or 'service'} does not accept connections on "
                          f"{address}:{port} after {timeout:.0f}s",
                          f"see `fabula logs <env> {host.name}`")


def remove_interrupted(host: Host, path: str, timeout: float = 30) -> None:
    """Remove what an interrupted earlier attempt left at `path`. A process of that attempt may
    still be finishing (a killed initdb's postgres child writes until its input closes), so
    `rm -rf` is tried again until it finds nothing new."""
    if not poll(lambda: host.run(["rm", "-rf", path]).ok, timeout, interval=0.5):
        host.check(["rm", "-rf", path])
