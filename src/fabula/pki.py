"""The environment's certificates: an internal CA for the links between servers (the seed's
snakeoil, but verifiable), and the load balancer's certificate (self-signed unless given)."""
from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fabula.state import EnvPaths, write_atomically

VALIDITY = dt.timedelta(days=825)


@dataclass(frozen=True)
class KeyPair:
    cert_pem: bytes
    key_pem: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject: str, issuer: x509.Name | None, public_key) -> x509.CertificateBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + VALIDITY))


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


class CertificateAuthority:
    """The environment's internal CA, created once and kept under pki/ (key 0600)."""

    def __init__(self, paths: EnvPaths):
        self.dir = paths.pki_dir
        self.cert_path = self.dir / "ca.pem"
        key_path = self.dir / "ca.key"
        if not (self.cert_path.exists() and key_path.exists()):
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            key = _new_key()
            cert = (_builder(f"fabula {paths.project}-{paths.env} internal CA", None, key.public_key())
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                 content_commitment=False, key_encipherment=False,
                                                 data_encipherment=False, key_agreement=False,
                                                 encipher_only=False, decipher_only=False), critical=True)
                    .sign(key, hashes.SHA256()))
            write_atomically(key_path, _key_pem(key), mode=0o600)
            write_atomically(self.cert_path, cert.public_bytes(serialization.Encoding.PEM))
        self._key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        self._cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())

    @property
    def cert_pem(self) -> bytes:
        return self.cert_path.read_bytes()

    def issue(self, common_name: str, names: list[str]) -> KeyPair:
        key = _new_key()
        cert = (_builder(common_name, self._cert.subject, key.public_key())
                .add_extension(_san(names), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(self._key, hashes.SHA256()))
        return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def self_signed(common_name: str, names: list[str]) -> KeyPair:
    key = _new_key()
    cert = (_builder(common_name, None, key.public_key()).add_extension(_san(names), critical=False)
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
