"""Certificates of the control plane: the cluster CA, node certificates, and the CA a
cluster secret stands for.

Every daemon proves who it is with a certificate whose name (CN and SAN DNS) is its
node name, signed by the cluster CA (tls.py checks the name against what the node
claims). Two ways to get one:

- *CA mode* (real clusters): ``dvmmctl cluster init --node NAME`` makes the CA and the
  first node's key and certificate; ``dvmmctl cluster add-node NAME`` issues another.
  The CA key stays where it was made; each node gets ca.crt, NAME.crt and NAME.key.
- *Secret mode* (the local demo and tests): the CA key is derived from the cluster
  secret (Ed25519 seed = HKDF-SHA256(secret)), its certificate is built from fixed
  fields, so every holder of the secret has the same CA; each daemon issues itself a
  fresh node certificate at start-up. Anyone with the secret can therefore sign a
  certificate for any name (docs/security.md).

All keys are Ed25519 (TLS 1.3 supports them; their signatures are deterministic,
which the secret-derived CA needs). Private keys are written 0600 and never sent.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import secrets
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dvmmd.vm.names import RULE, is_valid_name

__all__ = [
    "CA_DAYS",
    "NODE_DAYS",
    "PkiError",
    "add_node",
    "cert_names",
    "cert_pem",
    "check_private_mode",
    "fingerprint",
    "init_cluster",
    "issue_node_cert",
    "key_pem",
    "load_cert",
    "load_key",
    "new_ca",
    "secret_ca",
]

CA_DAYS = 20 * 365
NODE_DAYS = 5 * 365
CA_CERT = "ca.crt"
CA_KEY = "ca.key"

# Fixed fields of the secret-derived CA: the same on every node, whatever its clock.
_SECRET_CA_NAME = "dvmm cluster CA (derived from the cluster secret)"
_SECRET_CA_NOT_BEFORE = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
_SECRET_CA_NOT_AFTER = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
# A node certificate is valid from a day before it was made (clock skew between nodes).
_SKEW = dt.timedelta(days=1)


class PkiError(Exception):
    """A certificate or key problem; the message names the file and what is wrong."""


# --------------------------------------------------------------------------- building


def _hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=b"dvmm-control-plane-v1", info=info
    ).derive(secret)


def _ca_cert(
    key: Ed25519PrivateKey, name: str, serial: int, not_before: dt.datetime, not_after: dt.datetime
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    pub = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(pub)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .sign(key, None)
    )


def new_ca(
    name: str = "dvmm cluster CA", days: int = CA_DAYS
) -> tuple[Ed25519PrivateKey, x509.Certificate]:
    """A fresh random CA key and its self-signed certificate."""
    key = Ed25519PrivateKey.generate()
    now = dt.datetime.now(dt.UTC)
    cert = _ca_cert(
        key, name, x509.random_serial_number(), now - _SKEW, now + dt.timedelta(days=days)
    )
    return key, cert


def secret_ca(secret: bytes) -> tuple[Ed25519PrivateKey, x509.Certificate]:
    """The CA a cluster secret stands for: the same key and certificate from the same secret."""
    key = Ed25519PrivateKey.from_private_bytes(_hkdf(secret, b"dvmm cluster ca"))
    # A positive serial below 2^159 (RFC 5280: at most 20 octets), from the secret too.
    serial = int.from_bytes(_hkdf(secret, b"dvmm cluster ca serial", 19), "big") | 1
    cert = _ca_cert(key, _SECRET_CA_NAME, serial, _SECRET_CA_NOT_BEFORE, _SECRET_CA_NOT_AFTER)
    return key, cert


def issue_node_cert(
    ca_key: Ed25519PrivateKey,
    ca_cert: x509.Certificate,
    node: str,
    days: int = NODE_DAYS,
    key: Ed25519PrivateKey | None = None,
) -> tuple[Ed25519PrivateKey, x509.Certificate]:
    """A node key (fresh unless given) and its certificate for ``node``, signed by the CA.

    The name is both the CN and the only SAN DNS name; the certificate serves both
    ends of a connection (serverAuth + clientAuth), since every daemon dials and accepts.
    """
    if not is_valid_name(node):
        raise PkiError(f"invalid node name {node!r} ({RULE})")
    key = key or Ed25519PrivateKey.generate()
    now = dt.datetime.now(dt.UTC)
    pub = key.public_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .issuer_name(ca_cert.subject)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, None)
    )
    return key, cert


def cert_names(cert: x509.Certificate) -> list[str]:
    """The names a certificate is for: its SAN DNS names, else its CN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
        if names:
            return list(names)
    except x509.ExtensionNotFound:
        pass
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate (DER), as colon-free hex: what `openssl x509
    -fingerprint -sha256` shows, for comparing CAs by eye."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------- files


def check_private_mode(path: Path, what: str) -> None:
    """Refuse a private file (key, secret) that group or others can access."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise PkiError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PkiError(
            f"{what} {path} is accessible by group/others (mode {oct(mode & 0o777)}); chmod 600 it"
        )


def load_cert(path: Path, what: str = "certificate") -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PkiError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise PkiError(f"{what} {path} is not a PEM certificate: {e}") from None


def load_key(path: Path, what: str = "private key") -> Ed25519PrivateKey:
    check_private_mode(path, what)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PkiError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise PkiError(f"{what} {path} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PkiError(f"{what} {path} is a {type(key).__name__}, not an Ed25519 key")
    return key


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise PkiError(f"{path} already exists (not overwritten; --force replaces it)") from None
    except OSError as e:
        raise PkiError(f"cannot write {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # O_CREAT's mode does not apply to an existing file
        f.write(data)


def _write_node(
    directory: Path,
    ca_key: Ed25519PrivateKey,
    ca_cert: x509.Certificate,
    node: str,
    days: int,
    force: bool,
) -> list[Path]:
    key, cert = issue_node_cert(ca_key, ca_cert, node, days)
    kpath, cpath = directory / f"{node}.key", directory / f"{node}.crt"
    if not force:
        for p in (kpath, cpath):
            if p.exists():
                raise PkiError(f"{p} already exists (not overwritten; --force replaces it)")
    _write(kpath, key_pem(key), 0o600, force)
    _write(cpath, cert_pem(cert), 0o644, force)
    return [kpath, cpath]


def init_cluster(
    directory: Path, node: str, days: int = NODE_DAYS, ca_days: int = CA_DAYS, force: bool = False
) -> list[Path]:
    """Create the cluster CA in ``directory`` and the first node's key and certificate;
    returns the files written."""
    if not is_valid_name(node):
        raise PkiError(f"invalid node name {node!r} ({RULE})")
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise PkiError(f"cannot create {directory}: {e.strerror or e}") from None
    ca_key_path, ca_cert_path = directory / CA_KEY, directory / CA_CERT
    if not force:
        for p in (ca_key_path, ca_cert_path):
            if p.exists():
                raise PkiError(
                    f"{p} already exists: this directory has a cluster CA "
                    "(add nodes with `dvmmctl cluster add-node NAME`, or --force to replace it)"
                )
    ca_key, ca_cert = new_ca(days=ca_days)
    _write(ca_key_path, key_pem(ca_key), 0o600, force)
    _write(ca_cert_path, cert_pem(ca_cert), 0o644, force)
    return [ca_key_path, ca_cert_path, *_write_node(directory, ca_key, ca_cert, node, days, force)]


def add_node(directory: Path, node: str, days: int = NODE_DAYS, force: bool = False) -> list[Path]:
    """Issue a key and certificate for ``node`` with the CA in ``directory``."""
    ca_key = load_key(directory / CA_KEY, "CA key")
    ca_cert = load_cert(directory / CA_CERT, "CA certificate")
    if ca_key.public_key() != ca_cert.public_key():
        raise PkiError(f"{directory / CA_KEY} is not the key of {directory / CA_CERT}")
    return _write_node(directory, ca_key, ca_cert, node, days, force)


def random_secret_hex() -> str:
    """A new cluster secret (32 random bytes as hex), for the secret mode."""
    return secrets.token_hex(32)
