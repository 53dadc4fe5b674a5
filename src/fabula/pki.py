"""The environment's certificates: an internal CA for the links between servers (the seed's
snakeoil, but verifiable), and the load balancer's certificate (self-signed unless given).

Every certificate made here passes `openssl verify -x509_strict`: Subject/Authority Key
Identifiers, KeyUsage, ExtendedKeyUsage serverAuth on leaf certificates, a critical
BasicConstraints. They are made again when they are within RENEW_BEFORE of their expiry
(`fabula create` does it), so nothing expires under a running environment.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fabula.state import EnvPaths, write_atomically

VALIDITY = dt.timedelta(days=825)           # the internal CA and the servers' certificates
LB_VALIDITY = dt.timedelta(days=365)        # the default self-signed load-balancer certificate
RENEW_BEFORE = dt.timedelta(days=30)        # made again when expiring within this
INTERNAL_DOMAIN = "fabula.internal"


def internal_name(server: str, env: str, project: str) -> str:
    """The DNS name a server's internal certificate carries (beside its address), that HAProxy
    verifies: HAProxy's `verifyhost` matches DNS names only, never IP addresses."""
    return f"{server}.{env}.{project}.{INTERNAL_DOMAIN}"


@dataclass(frozen=True)
class KeyPair:
    cert_pem: bytes
    key_pem: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                         key_agreement=False, encipher_only=False, decipher_only=False)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, validity: dt.timedelta) -> x509.CertificateBuilder:
    now = _now()
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + validity)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def _leaf(builder: x509.CertificateBuilder, names: list[str]) -> x509.CertificateBuilder:
    return (builder.add_extension(_san(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))


def _has_extension(cert: x509.Certificate, kind) -> bool:
    try:
        cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return False
    return True


def _same_key(cert: x509.Certificate, key) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def _expiring(cert: x509.Certificate) -> bool:
    return cert.not_valid_after_utc - _now() < RENEW_BEFORE


class CertificateAuthority:
    """The environment's internal CA, kept under pki/ (key 0600).

    Made once, under an exclusive lock on pki/ca.lock: two fabula commands starting at the same
    time on a new environment end with one CA, and a key that matches its certificate (the key
    is written before the certificate, both by rename, and readers take the same lock). Its
    certificate is signed again with the same key when it nears expiry or lacks the extensions
    `-x509_strict` needs: what it issued before stays valid under the new one."""

    def __init__(self, paths: EnvPaths):
        self.dir = paths.pki_dir
        self.project, self.env = paths.project, paths.env
        self.cert_path = self.dir / "ca.pem"
        self.key_path = self.dir / "ca.key"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._locked():
            key = self._load_key()
            if key is None:
                key = _new_key()
                write_atomically(self.key_path, _key_pem(key), mode=0o600)
                cert = None
            else:
                cert = self._load_cert()
            if cert is None or not self._cert_is_good(cert, key):
                cert = self._self_sign(key)
                write_atomically(self.cert_path, cert.public_bytes(serialization.Encoding.PEM))
        self._key, self._cert = key, cert
        self._cert_pem = cert.public_bytes(serialization.Encoding.PEM)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.dir / "ca.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)   # releases the lock

    def _load_key(self):
        try:
            return serialization.load_pem_private_key(self.key_path.read_bytes(), None)
        except FileNotFoundError:
            return None

    def _load_cert(self) -> x509.Certificate | None:
        try:
            return x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except (FileNotFoundError, ValueError):
            return None

    def _cert_is_good(self, cert: x509.Certificate, key) -> bool:
        return (_same_key(cert, key) and not _expiring(cert)
                and _has_extension(cert, x509.SubjectKeyIdentifier) and _has_extension(cert, x509.KeyUsage))

    def _self_sign(self, key) -> x509.Certificate:
        name = _name(f"fabula {self.project}-{self.env} internal CA")
        return (_builder(name, name, key.public_key(), VALIDITY)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(_key_usage(cert_sign=True), critical=True)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))

    @property
    def cert_pem(self) -> bytes:
        return self._cert_pem

    def server_name(self, server: str) -> str:
        """The DNS name of `server`'s certificate (see internal_name)."""
        return internal_name(server, self.env, self.project)

    def issue(self, common_name: str, names: list[str]) -> KeyPair:
        key = _new_key()
        ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (_leaf(_builder(_name(common_name), self._cert.subject, key.public_key(), VALIDITY), names)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
                .sign(self._key, hashes.SHA256()))
        return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def is_current(self, cert_pem: bytes, key_pem: bytes | None) -> bool:
        """Whether a certificate this CA issued can stay: issued by this CA, for `key_pem`, not
        expiring within RENEW_BEFORE, and with the extensions of today's certificates (its names
        are the caller's to compare, see certificate_names)."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem or b"", None)
            cert.verify_directly_issued_by(self._cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return (_same_key(cert, key) and not _expiring(cert)
                and _has_extension(cert, x509.AuthorityKeyIdentifier) and _has_extension(cert, x509.KeyUsage))


def self_signed(common_name: str, names: list[str], validity: dt.timedelta = LB_VALIDITY) -> KeyPair:
    key = _new_key()
    name = _name(common_name)
    cert = (_leaf(_builder(name, name, key.public_key(), validity), names)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def certificate_names(cert_pem: bytes) -> list[str]:
    """The names a certificate is valid for, to decide whether it must be reissued."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName)


def needs_renewal(cert_pem: bytes | None, names: list[str], max_lifetime: dt.timedelta | None = None) -> bool:
    """Whether a certificate (the first in `cert_pem`) must be made again: missing or unreadable,
    for other names, expiring within RENEW_BEFORE, or valid for longer than `max_lifetime`."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem or b"")
        current = sorted(certificate_names(cert_pem or b""))
    except ValueError:
        return True
    if current != sorted(names) or _expiring(cert):
        return True
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return max_lifetime is not None and lifetime > max_lifetime + dt.timedelta(days=1)
