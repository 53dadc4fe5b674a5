"""The load balancer as HAProxy on a host of the provider's (the machine's own namespace locally,
the `lb` host over SSH): terminating TLS and health-checking each web server over HTTPS
(GET /healthcheck.html). Everything goes through the platform host's transport: its files, its
supervisor, and HAProxy's runtime API (its stats socket, through socat)."""
from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from pathlib import Path

from fabula.config import LoadBalancerConfig
from fabula.errors import FabulaError
from fabula.pki import LB_VALIDITY, internal_name, needs_renewal, self_signed
from fabula.providers.base import Backend, Host, LoadBalancer
from fabula.supervisor import RUNNING, Program, Supervisor
from fabula.templates import render

# what the load balancer's host needs (python3: the socket holder)
PACKAGES = ("haproxy", "socat", "python3", "supervisor")
SOCKET_HOLDER = Path(__file__).with_name("socket_holder.py")

CHECK_INTERVAL = "1s"  # with fall 2 and FAST_INTERVAL: a dead server is out within about 1.5 s
FAST_INTERVAL = "250ms"  # checks while a server goes down or comes back up (rise 2: up 0.5 s after)
ERROR_LIMIT = 3  # connections in a row that fail on live traffic: the server is out at once

# Mozilla's "intermediate" configuration, v5.7 (https://ssl-config.mozilla.org/)
CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
           "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
           "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305")
CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
CURVES = "X25519:prime256v1:secp384r1"
HSTS_MAX_AGE = 63072000   # two years
# a host name the HTTP port may redirect to: exact names only (no ".example.com" or "*" patterns)
_HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")


class HAProxyLoadBalancer(LoadBalancer):
    def __init__(self, platform: Host, lb: LoadBalancerConfig, ca_file: Path, project: str, env: str, *,
                 public_address: str, bind: str, domains: Sequence[str] = ()):
        self.platform, self.lb, self.ca_file = platform, lb, ca_file
        self.dir = platform.root   # HAProxy's files, and its supervisor's
        self.public_address = public_address   # where clients reach it: its URL, its certificate
        self.bind = bind   # the address HAProxy listens on (0.0.0.0: every address of its host)
        self.project, self.env = project, env
        self.domains = tuple(domains)   # the site's names: where the HTTP port may redirect to
        self.supervisor = Supervisor(platform)

    def url(self) -> str:
        port = "" if self.lb.https_port == 443 else f":{self.lb.https_port}"
        return f"https://{self.public_address}{port}/"

    def is_running(self) -> bool:
        return self.supervisor.is_running()

    def _certificate(self) -> bytes:
        certificate, key = self.lb.certificate, self.lb.key  # both or neither (LoadBalancerConfig)
        if certificate is not None and key is not None:
            try:
                return certificate.read_bytes().rstrip() + b"\n" + key.read_bytes()
            except OSError as exc:
                raise FabulaError(f"lb.certificate/lb.key: cannot read {exc.filename}: {exc.strerror}",
                                  "point lb.certificate and lb.key at readable PEM files") from None
        names = [self.public_address, "localhost"]
        existing = self.platform.read_file(self.dir / "lb.pem")
        # made again within 30 days of its expiry, like the internal certificates
        if existing and not needs_renewal(existing, names, max_lifetime=LB_VALIDITY):
            return existing
        pair = self_signed(f"{self.project}-{self.env}", names)
        return pair.cert_pem + pair.key_pem

    def known_hosts(self) -> list[str]:
        """The names the HTTP port redirects to as asked; any other Host goes to the public address."""
        names = [self.public_address] + [h.lower() for h in self.domains if _HOST_NAME.match(h.lower())]
        return list(dict.fromkeys(names))

    def ensure(self, backends: list[Backend]) -> None:
        host = self.platform
        host.make_dirs([self.dir])
        certificate_changed = host.put_file(self.dir / "lb.pem", self._certificate(), mode=0o600)
        certificate_changed |= host.put_file(self.dir / "ca.pem", self.ca_file.read_bytes())
        host.put_file(self.dir / "socket_holder.py", SOCKET_HOLDER.read_bytes())
        https_suffix = "" if self.lb.https_port == 443 else f":{self.lb.https_port}"
        listen = [self._address(self.lb.https_port), self._address(self.lb.http_port)]

        def config_for(https_listener: str, http_listener: str) -> str:
            return render(__file__, "haproxy.cfg.j2", project=self.project, env=self.env, lb_dir=self.dir,
                          public_address=self.public_address, http_port=self.lb.http_port,
                          https_port=self.lb.https_port, https_listener=https_listener,
                          http_listener=http_listener, https_suffix=https_suffix, ca_file=self.dir / "ca.pem",
                          check_interval=CHECK_INTERVAL, fast_interval=FAST_INTERVAL, error_limit=ERROR_LIMIT,
                          servers=[(b, internal_name(b.name, self.env, self.project)) for b in backends],
                          known_hosts=self.known_hosts(), ciphers=CIPHERS, ciphersuites=CIPHERSUITES,
                          curves=CURVES, hsts_max_age=HSTS_MAX_AGE)

        # the sockets are inherited (fd@3, fd@4: see socket_holder); the check, which binds
        # nothing, reads the same configuration with their addresses in their place
        config = config_for("fd@3", "fd@4")
        candidate = self.dir / "haproxy.cfg.new"
        host.put_file(candidate, config_for(*listen), mode=0o600)
        checked = host.run(["haproxy", "-c", "-q", "-f", str(candidate)])
        if not checked.ok:
            raise FabulaError(f"load balancer: HAProxy rejects the generated configuration "
                              f"{candidate} on {host.name}:\n{checked.stdout}{checked.stderr}")
        host.run(["rm", "-f", str(candidate)])
        changed = host.put_file(self.dir / "haproxy.cfg", config)
        self.supervisor.ensure_running()
        holder = ["python3", "-I", str(self.dir / "socket_holder.py"), "--pidfile", str(self.dir / "haproxy.pid")]
        holder += [arg for address in listen for arg in ("--listen", address)]
        started = self.supervisor.apply([Program(
            name="haproxy", command=[*holder, "--", "haproxy", "-W", "-db", "-f", str(self.dir / "haproxy.cfg")],
            stopsignal="USR1", stopwaitsecs=30)])
        if (changed or certificate_changed) and not started:
            # seamless reload: the master starts new workers, old ones finish their connections
            self.supervisor.signal("haproxy", "USR2")
        self.supervisor.wait_running(["haproxy"], timeout=30)

    def start_ahead(self) -> None:
        # supervisord waits STARTSECS (1 s) before HAProxy counts as running: spent here, beside the
        # app servers' start, the load balancer phase is a reload
        if self.supervisor.status().get("haproxy") != RUNNING:   # {} when supervisord does not answer
            self.ensure([])

    def _address(self, port: int) -> str:
        return f"[{self.bind}]:{port}" if ":" in str(self.bind) else f"{self.bind}:{port}"

    def _command(self, command: str) -> str:
        """A command on HAProxy's runtime API (its stats socket); '' when HAProxy does not answer."""
        result = self.platform.run(["socat", "-t", "3", "-", f"UNIX-CONNECT:{self.dir / 'haproxy.sock'}"],
                                   input=command + "\n", timeout=10)
        return result.stdout if result.ok else ""

    def _stats(self) -> list[dict[str, str]]:
        text = self._command("show stat").lstrip("# ")
        return list(csv.DictReader(io.StringIO(text))) if text else []

    def drain(self, name: str) -> None:
        self._command(f"set server web/{name} state drain")

    def ready(self, name: str) -> None:
        self._command(f"set server web/{name} state ready")

    def active_requests(self, name: str) -> int:
        for row in self._stats():
            if row.get("pxname") == "web" and row.get("svname") == name:
                return int(row.get("scur") or 0)
        return 0

    def stats(self) -> dict[str, dict[str, str]]:
        """Per web server: HAProxy's counters (scur current sessions, rate, req_rate, status...)."""
        return {row["svname"]: row for row in self._stats()
                if row.get("pxname") == "web" and row.get("svname") not in ("FRONTEND", "BACKEND")}

    def health(self) -> dict[str, str]:
        return {row["svname"]: row["status"] for row in self._stats()
                if row.get("pxname") == "web" and row.get("svname") not in ("FRONTEND", "BACKEND")}

    def stop(self) -> None:
        if self.is_running():
            self.supervisor.shutdown()
        # the holder stops HAProxy on its way out; a HAProxy whose holder was killed runs on alone
        self.platform.run(["sh", "-c", STOP_LEFTOVER, "sh", str(self.dir / "haproxy.pid")], timeout=40)


# TERM to the HAProxy the pidfile names (if it is one), then wait up to 30 s for it to go
STOP_LEFTOVER = """pid=$(cat -- "$1" 2>/dev/null) || exit 0
case $pid in ''|*[!0-9]*) exit 0;; esac
is_haproxy() { tr '\\0' '\\n' < /proc/$pid/cmdline 2>/dev/null | head -n1 | grep -q 'haproxy$'; }
is_haproxy || exit 0
kill -TERM "$pid" 2>/dev/null
i=0; while is_haproxy && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
"""
