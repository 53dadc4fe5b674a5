"""TLS of the load balancer and of the links behind it, on a real environment:

- the load balancer follows Mozilla's "intermediate" profile (v5.7): TLS 1.2 and 1.3 only, its
  cipher suites and curves only, a certificate of at most a year (trust aside: it is self-signed
  by default); checked with openssl s_client per protocol, cipher suite and curve, and with
  sslyze's own Mozilla checker when an sslyze is at hand (FABULA_SSLYZE or `sslyze` on PATH: it
  cannot be a test dependency, it needs cryptography<47 and fabula pins 50);
- HSTS, and an HTTP port that redirects only to the environment's own names;
- HAProxy verifies each web server's certificate name, not just the CA: a server presenting a
  certificate of the environment's CA for another name goes DOWN;
- every internal certificate passes `openssl verify -x509_strict`;
- the health check does not tell which release runs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import httpx
import pytest

from tests.e2e.local.conftest import ENV, running_environment
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

SERVERS = "{web: 2, worker: 1, cache: 1, db-primary: 1, db-replica: 0}"
EXTRA_HOST = "www.tls.example"

MOZILLA_CIPHERS = {"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                   "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
                   "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305"}
MOZILLA_TLS13 = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
MOZILLA_GROUPS = {"X25519", "P-256", "P-384"}


@pytest.fixture(scope="module")
def environment():
    with running_environment("tls", servers=SERVERS, extra=f"    hosts: [{EXTRA_HOST}]\n") as env:
        yield env


def handshake(port: int, *options: str) -> dict | None:
    """openssl s_client against the load balancer: the negotiated protocol and cipher, or None."""
    result = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                             "-brief", *options], input="", capture_output=True, text=True, timeout=20)
    if result.returncode != 0 or "CONNECTION ESTABLISHED" not in result.stderr:
        return None
    found = dict(re.findall(r"^([A-Za-z ]+): (.*)$", result.stderr, re.M))
    return {"protocol": found.get("Protocol version"), "cipher": found.get("Ciphersuite"),
            "group": found.get("Server Temp Key") or found.get("Peer Temp Key", "")}


def test_only_tls_1_2_and_1_3(environment):
    port = environment.https_port
    # the client is allowed everything (SECLEVEL 0): only the server can refuse
    for old in ("-tls1", "-tls1_1"):
        assert handshake(port, old, "-cipher", "ALL:@SECLEVEL=0") is None, old
    assert handshake(port, "-tls1_2")["protocol"] == "TLSv1.2"
    assert handshake(port, "-tls1_3")["protocol"] == "TLSv1.3"


def test_only_mozilla_intermediate_cipher_suites(environment):
    port = environment.https_port
    known = subprocess.run(["openssl", "ciphers", "ALL:COMPLEMENTOFALL:@SECLEVEL=0"],
                           capture_output=True, text=True, check=True).stdout.strip().split(":")
    tls12 = [c for c in known if not c.startswith("TLS_")]
    assert len(tls12) > 50   # the check below means something only if openssl offers the weak ones
    accepted = {c for c in tls12 if handshake(port, "-tls1_2", "-cipher", f"{c}:@SECLEVEL=0")}
    assert accepted <= MOZILLA_CIPHERS, f"not in Mozilla's intermediate list: {accepted - MOZILLA_CIPHERS}"
    # the default certificate is ECDSA: its three ECDHE-ECDSA suites are all there (no CBC, no RSA kx)
    assert {c for c in MOZILLA_CIPHERS if c.startswith("ECDHE-ECDSA")} <= accepted
    tls13 = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
             "TLS_AES_128_CCM_SHA256", "TLS_AES_128_CCM_8_SHA256"]
    accepted13 = {c for c in tls13 if handshake(port, "-tls1_3", "-ciphersuites", c)}
    assert accepted13 == MOZILLA_TLS13


TEMP_KEYS = {"X25519": "X25519", "X448": "X448", "prime256v1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def group_of(temp_key: str) -> str:
    """openssl's "Server Temp Key" ("X25519, 253 bits", "ECDH, prime256v1, 256 bits", "DH, 2048 bits")."""
    parts = [p.strip() for p in temp_key.split(",")]
    return "ffdhe" if parts[0] == "DH" else TEMP_KEYS.get(parts[1] if parts[0] == "ECDH" else parts[0], parts[0])


def test_only_the_recommended_curves(environment):
    port = environment.https_port
    candidates = ("X25519", "P-256", "P-384", "X448", "P-521", "ffdhe2048", "ffdhe3072")
    # TLS 1.3: offered alone, a group is either used or the handshake fails
    accepted13 = set()
    for group in candidates:
        result = handshake(port, "-tls1_3", "-groups", group)
        if result:
            assert group_of(result["group"]) == group_of_name(group)
            accepted13.add(group)
    assert accepted13 == MOZILLA_GROUPS
    # TLS 1.2: the client's groups also bound the ECDSA certificate's curve (P-256), so each one is
    # offered first, before P-256; the server takes the client's first choice when it has it
    accepted12 = set()
    for group in candidates:
        result = handshake(port, "-tls1_2", "-groups", group if group == "P-256" else f"{group}:P-256")
        if group_of(result["group"]) == group_of_name(group):
            accepted12.add(group)
    assert accepted12 == MOZILLA_GROUPS


def group_of_name(group: str) -> str:
    return "ffdhe" if group.startswith("ffdhe") else group


def test_load_balancer_certificate(environment):
    """ECDSA P-256, ecdsa-with-SHA256, at most a year (Mozilla: 366 days), x509-strict."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    pem = (environment.env_dir / "lb" / "lb.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey) and cert.public_key().curve.name == "secp256r1"
    assert cert.signature_algorithm_oid._name == "ecdsa-with-SHA256"
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 366
    lb_pem = environment.env_dir / "lb" / "lb.pem"
    checked = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(lb_pem), str(lb_pem)],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def sslyze_command() -> list[str] | None:
    found = os.environ.get("FABULA_SSLYZE") or shutil.which("sslyze")
    return [found] if found else None


def test_sslyze_mozilla_intermediate(environment, tmp_path):
    command = sslyze_command()
    if not command:
        pytest.skip("no sslyze (set FABULA_SSLYZE to an sslyze executable; see the module docstring)")
    out = tmp_path / "sslyze.json"
    result = subprocess.run([*command, "--mozilla_config=intermediate", f"--json_out={out}",
                             f"127.0.0.1:{environment.https_port}"], capture_output=True, text=True, timeout=600)
    report = result.stdout
    # the one finding allowed: the default certificate is self-signed, so no path validation
    compliance = report.partition("COMPLIANCE AGAINST TLS CONFIGURATION")[2]
    assert "intermediate" in compliance, report
    issues = re.findall(r"^\s+\* (\w+): (.*)$", compliance, re.M)
    assert issues and {name for name, _ in issues} == {"certificate_path_validation"}, report
    scan = json.loads(out.read_text())["server_scan_results"][0]
    assert scan["scan_status"] == "COMPLETED", report


def test_hsts(environment):
    response = httpx.get(environment.url + "/", verify=False, timeout=30)
    assert response.headers["strict-transport-security"] == "max-age=63072000"


def redirect(environment, host: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{environment.http_port}/polls/?a=1", headers={"Host": host},
                     follow_redirects=False, timeout=30)


def test_http_redirects_to_https_on_a_known_host_only(environment):
    https = f":{environment.https_port}/polls/?a=1"
    for host in ("evil.example", f"evil.example:{environment.http_port}", "127.0.0.1.evil.example", "EVIL.example"):
        response = redirect(environment, host)
        assert response.status_code == 301
        assert response.headers["location"] == f"https://127.0.0.1{https}", host
    assert redirect(environment, f"127.0.0.1:{environment.http_port}").headers["location"] == f"https://127.0.0.1{https}"
    assert redirect(environment, EXTRA_HOST).headers["location"] == f"https://{EXTRA_HOST}{https}"


def web_servers(environment) -> list[str]:
    return sorted(s["name"] for s in environment.describe()["servers"] if s["role"] == "web")


def lb_health(environment) -> dict[str, str]:
    return environment.describe()["load_balancer"]["backends"]


def last_check(environment, server: str) -> str:
    """HAProxy's own words on its last health check of `server` (its runtime API)."""
    return next(row["last_chk"] for row in environment.haproxy_stats() if row["svname"] == server)


def test_haproxy_verifies_each_web_servers_name(environment):
    from fabula import pki
    from fabula.state import EnvPaths
    config = (environment.env_dir / "lb" / "haproxy.cfg").read_text()
    names = web_servers(environment)
    for name in names:
        expected = pki.internal_name(name, ENV, environment.project)
        assert re.search(rf"^\s+server {name} \S+ verifyhost {re.escape(expected)} sni str\({re.escape(expected)}\)",
                         config, re.M), config
    assert "noreuseport" in config

    # the first web server presents a certificate of the environment's own CA, for another name
    victim, other = names[0], names[1]
    wait_for(lambda: set(lb_health(environment).values()) == {"UP"}, timeout=60, message="all web servers UP")
    ca = pki.CertificateAuthority(EnvPaths(environment.state_dir, environment.project, ENV))
    impostor = ca.issue(ca.server_name(other), [environment.address(victim), ca.server_name(other)])
    nginx_dir = environment.env_dir / "servers" / victim / "etc" / "nginx"
    (nginx_dir / "server.crt").write_bytes(impostor.cert_pem)
    (nginx_dir / "server.key").write_bytes(impostor.key_pem)
    assert environment.supervisorctl(victim, "signal", "HUP", "nginx").returncode == 0
    wait_for(lambda: lb_health(environment).get(victim) == "DOWN", timeout=30,
             message=f"HAProxy to refuse {victim}'s certificate for {other}")
    assert lb_health(environment).get(other) == "UP"
    assert "certificate different from the expected one" in last_check(environment, victim)

    # `fabula create` issues the right certificate again (its names differ), and the server is back
    created = environment.fabula("create", ENV, timeout=900)
    assert created.returncode == 0, created.stdout + created.stderr
    wait_for(lambda: lb_health(environment).get(victim) == "UP", timeout=60, message=f"{victim} UP again")


def test_internal_certificates_pass_x509_strict(environment):
    from fabula.pki import certificate_names
    ca = environment.env_dir / "pki" / "ca.pem"
    certificates = sorted((environment.env_dir / "servers").glob("*/**/server.crt"))
    assert len(certificates) >= 3   # web servers and the database
    for path in [ca, *certificates]:
        checked = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(ca), str(path)],
                                 capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    for path in certificates:
        server = path.relative_to(environment.env_dir / "servers").parts[0]
        assert f"{server}.{ENV}.{environment.project}.fabula.internal" in certificate_names(path.read_bytes())


def test_healthcheck_does_not_tell_the_release(environment):
    release = environment.describe()["release"]
    assert release
    response = httpx.get(environment.url + "/healthcheck.html", verify=False, timeout=30)
    assert response.status_code == 200
    assert release not in response.text and response.text.strip() == "ok"
