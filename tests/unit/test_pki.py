"""The internal CA and its certificates: strict X.509 (openssl verify -x509_strict), renewal
within 30 days of expiry, and one CA (with a matching key) however many commands create it at once."""
from __future__ import annotations

import datetime as dt
import multiprocessing
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fabula import pki
from fabula.state import EnvPaths


def paths(tmp_path: Path, env: str = "ci") -> EnvPaths:
    return EnvPaths(tmp_path, "polls", env)


def openssl_verify(ca_pem: bytes, cert_pem: bytes, tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "ca-check.pem").write_bytes(ca_pem)
    (tmp_path / "cert-check.pem").write_bytes(cert_pem)
    return subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(tmp_path / "ca-check.pem"),
                           str(tmp_path / "cert-check.pem")], capture_output=True, text=True)


def extension(cert: x509.Certificate, kind):
    return cert.extensions.get_extension_for_class(kind)


def test_ca_and_issued_certificates_pass_x509_strict(tmp_path):
    ca = pki.CertificateAuthority(paths(tmp_path))
    pair = ca.issue(ca.server_name("web1"), ["10.213.0.10", ca.server_name("web1")])
    assert openssl_verify(ca.cert_pem, ca.cert_pem, tmp_path).returncode == 0
    checked = openssl_verify(ca.cert_pem, pair.cert_pem, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_ca_extensions(tmp_path):
    cert = x509.load_pem_x509_certificate(pki.CertificateAuthority(paths(tmp_path)).cert_pem)
    constraints = extension(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = extension(cert, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    ski = extension(cert, x509.SubjectKeyIdentifier).value
    assert extension(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ski.digest


def test_leaf_extensions(tmp_path):
    ca = pki.CertificateAuthority(paths(tmp_path))
    name = ca.server_name("web1")
    cert = x509.load_pem_x509_certificate(ca.issue(name, ["10.213.0.10", name]).cert_pem)
    ca_ski = extension(x509.load_pem_x509_certificate(ca.cert_pem), x509.SubjectKeyIdentifier).value
    assert extension(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski.digest
    assert extension(cert, x509.SubjectKeyIdentifier).value.digest != ca_ski.digest
    assert not extension(cert, x509.BasicConstraints).value.ca
    usage = extension(cert, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert extension(cert, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH])
    # HAProxy's verifyhost matches DNS names only: the address alone would not do
    assert pki.certificate_names(cert.public_bytes(serialization.Encoding.PEM)) == [
        "10.213.0.10", "web1.ci.polls.fabula.internal"]


def test_self_signed_certificate_lives_at_most_a_year_and_passes_x509_strict(tmp_path):
    pair = pki.self_signed("polls-ci", ["127.0.0.1", "localhost"])
    cert = x509.load_pem_x509_certificate(pair.cert_pem)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=366)
    assert openssl_verify(pair.cert_pem, pair.cert_pem, tmp_path).returncode == 0


def test_is_current(tmp_path, monkeypatch):
    ca = pki.CertificateAuthority(paths(tmp_path))
    pair = ca.issue("x", ["10.213.0.10"])
    assert ca.is_current(pair.cert_pem, pair.key_pem)
    assert not ca.is_current(pair.cert_pem, ca.issue("x", ["10.213.0.10"]).key_pem)   # another key
    other = pki.CertificateAuthority(paths(tmp_path, "other")).issue("x", ["10.213.0.10"])
    assert not ca.is_current(other.cert_pem, other.key_pem)                           # another CA
    assert not ca.is_current(b"garbage", pair.key_pem)
    monkeypatch.setattr(pki, "VALIDITY", dt.timedelta(days=29))
    expiring = ca.issue("x", ["10.213.0.10"])
    assert not ca.is_current(expiring.cert_pem, expiring.key_pem)
    monkeypatch.setattr(pki, "VALIDITY", dt.timedelta(days=31))
    fine = ca.issue("x", ["10.213.0.10"])
    assert ca.is_current(fine.cert_pem, fine.key_pem)


def test_needs_renewal():
    names = ["127.0.0.1", "localhost"]
    pair = pki.self_signed("lb", names)
    pem = pair.cert_pem + pair.key_pem   # as the load balancer keeps it
    assert not pki.needs_renewal(pem, list(reversed(names)), max_lifetime=pki.LB_VALIDITY)
    assert pki.needs_renewal(pem, ["10.0.0.1", "localhost"])
    assert pki.needs_renewal(None, names) and pki.needs_renewal(b"", names)
    assert pki.needs_renewal(pki.self_signed("lb", names, validity=dt.timedelta(days=29)).cert_pem, names)
    assert not pki.needs_renewal(pki.self_signed("lb", names, validity=dt.timedelta(days=31)).cert_pem, names)
    # one made for longer than a year (by an older fabula) is replaced
    assert pki.needs_renewal(pki.self_signed("lb", names, validity=dt.timedelta(days=825)).cert_pem, names,
                             max_lifetime=pki.LB_VALIDITY)


def test_ca_certificate_is_renewed_within_30_days_with_the_same_key(tmp_path, monkeypatch):
    monkeypatch.setattr(pki, "VALIDITY", dt.timedelta(days=20))
    old = pki.CertificateAuthority(paths(tmp_path))
    leaf = old.issue("web1", ["10.213.0.10"])
    monkeypatch.setattr(pki, "VALIDITY", dt.timedelta(days=825))
    new = pki.CertificateAuthority(paths(tmp_path))
    assert new.cert_pem != old.cert_pem
    new_cert = x509.load_pem_x509_certificate(new.cert_pem)
    assert new_cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=800)
    # what the old certificate issued still verifies: same key, same name
    assert openssl_verify(new.cert_pem, leaf.cert_pem, tmp_path).returncode == 0
    assert pki.CertificateAuthority(paths(tmp_path)).cert_pem == new.cert_pem   # and then it stays


def test_ca_certificate_without_the_extensions_is_signed_again(tmp_path):
    """A CA made by an older fabula (no Subject Key Identifier) gets a strict certificate, same key."""
    from cryptography.hazmat.primitives import hashes
    p = paths(tmp_path)
    ca = pki.CertificateAuthority(p)
    key = serialization.load_pem_private_key((p.pki_dir / "ca.key").read_bytes(), None)
    name = x509.load_pem_x509_certificate(ca.cert_pem).subject
    now = dt.datetime.now(dt.UTC)
    legacy = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
              .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=800))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .sign(key, hashes.SHA256()))
    (p.pki_dir / "ca.pem").write_bytes(legacy.public_bytes(serialization.Encoding.PEM))
    renewed = pki.CertificateAuthority(p)
    assert openssl_verify(renewed.cert_pem, renewed.cert_pem, tmp_path).returncode == 0
    assert x509.load_pem_x509_certificate(renewed.cert_pem).public_key() == key.public_key()


def test_a_ca_key_that_does_not_match_its_certificate_is_repaired(tmp_path):
    """What the unlocked creation of older versions could leave: the key signs, so it stays."""
    p = paths(tmp_path)
    pki.CertificateAuthority(p)
    stray = pki.CertificateAuthority(paths(tmp_path, "other"))
    (p.pki_dir / "ca.pem").write_bytes(stray.cert_pem)
    ca = pki.CertificateAuthority(p)
    key = serialization.load_pem_private_key((p.pki_dir / "ca.key").read_bytes(), None)
    assert x509.load_pem_x509_certificate(ca.cert_pem).public_key() == key.public_key()


def matching_pair(pki_dir: Path) -> bool:
    key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), None)
    cert = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    return cert.public_key() == key.public_key()


def create_ca(root: str) -> bytes:
    ca = pki.CertificateAuthority(EnvPaths(Path(root), "polls", "ci"))
    # what this command would sign with must be what the certificate says
    key = ca._key.public_key()
    assert x509.load_pem_x509_certificate(ca.cert_pem).public_key() == key
    return ca.cert_pem


def test_concurrent_threads_create_one_ca(tmp_path):
    for trial in range(20):
        root = tmp_path / str(trial)
        with ThreadPoolExecutor(8) as pool:
            certs = set(pool.map(create_ca, [str(root)] * 8))
        assert len(certs) == 1
        assert matching_pair(paths(root).pki_dir)


@pytest.mark.timeout(120)
def test_concurrent_processes_create_one_ca(tmp_path):
    context = multiprocessing.get_context("fork")
    with context.Pool(8) as pool:
        for trial in range(40):
            root = tmp_path / str(trial)
            certs = set(pool.map(create_ca, [str(root)] * 8, chunksize=1))
            assert len(certs) == 1, f"trial {trial}: {len(certs)} different CA certificates"
            assert matching_pair(paths(root).pki_dir)
