"""Mutual TLS 1.3 for every daemon-to-daemon (and remote API) connection.

A node's `Identity` holds two ``ssl`` contexts built from the cluster CA and the
node's own key and certificate (pki.py): one to accept, one to dial. Both require a
certificate from the other end signed by the cluster CA (CERT_REQUIRED both ways),
speak TLS 1.3 only, and never resume sessions (every connection proves its identity
afresh). Host names are not checked: a daemon dials addresses, and the identity that
matters is the node name in the certificate, which auth.py compares with the name the
peer claims in ``hello``/``welcome``.

The private key is handed to OpenSSL through a memfd (``/proc/self/fd/N``), so in
secret mode the key a daemon issues itself never touches a disk.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dvmmd.security import pki
from dvmmd.security.secret import SecretError, load_secret

__all__ = [
    "Identity",
    "IdentityError",
    "identity_from_files",
    "identity_from_secret",
    "load_identity",
    "peer_names",
]


class IdentityError(Exception):
    """This node's TLS identity cannot be set up; the message names the file and why."""


@dataclass(frozen=True)
class Identity:
    """This node's credentials for the control plane."""

    node: str
    mode: str  # "ca": certificate files from `dvmmctl cluster init`; "secret": derived
    server: ssl.SSLContext
    client: ssl.SSLContext
    ca_fingerprint: str

    def describe(self) -> str:
        how = "CA certificate files" if self.mode == "ca" else "CA derived from the cluster secret"
        return f"mutual TLS 1.3, {how}, CA sha256 {self.ca_fingerprint[:16]}"


def _context(side: int, ca_pem: bytes, chain_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if side == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False  # identity = the node name, checked by auth.py
    else:
        ctx.num_tickets = 0  # no resumption: every connection shows its certificate
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    fd = os.memfd_create("dvmm-tls-identity", os.MFD_CLOEXEC)
    try:
        view = memoryview(chain_pem)
        while view:
            view = view[os.write(fd, view) :]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return ctx


def _identity(
    node: str,
    mode: str,
    ca_cert: x509.Certificate,
    key: Ed25519PrivateKey,
    cert: x509.Certificate,
) -> Identity:
    ca_pem = pki.cert_pem(ca_cert)
    chain = pki.cert_pem(cert) + pki.key_pem(key)
    try:
        server = _context(ssl.PROTOCOL_TLS_SERVER, ca_pem, chain)
        client = _context(ssl.PROTOCOL_TLS_CLIENT, ca_pem, chain)
    except (ssl.SSLError, OSError) as e:
        raise IdentityError(f"cannot set up TLS for node {node}: {e}") from None
    return Identity(node, mode, server, client, pki.fingerprint(ca_cert))


def identity_from_secret(secret: bytes, node: str) -> Identity:
    """Secret mode: the secret's CA, and a node certificate issued here and now."""
    ca_key, ca_cert = pki.secret_ca(secret)
    try:
        key, cert = pki.issue_node_cert(ca_key, ca_cert, node)
    except pki.PkiError as e:
        raise IdentityError(str(e)) from None
    return _identity(node, "secret", ca_cert, key, cert)


def identity_from_files(ca_file: Path, cert_file: Path, key_file: Path, node: str) -> Identity:
    """CA mode: check the files (readable, key private, certificate for this node,
    signed by the CA, key matches) and build the contexts."""
    try:
        ca_cert = pki.load_cert(ca_file, "CA certificate (tls.ca_file)")
        cert = pki.load_cert(cert_file, "node certificate (tls.cert_file)")
        key = pki.load_key(key_file, "node key (tls.key_file)")
    except pki.PkiError as e:
        raise IdentityError(str(e)) from None
    names = pki.cert_names(cert)
    if node not in names:
        raise IdentityError(
            f"node certificate {cert_file} is for {', '.join(names) or 'no name'}, "
            f"not for this node ({node}): issue one with `dvmmctl cluster add-node {node}`"
        )
    if key.public_key() != cert.public_key():
        raise IdentityError(f"node key {key_file} is not the key of certificate {cert_file}")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise IdentityError(
            f"node certificate {cert_file} is not signed by the CA in {ca_file}"
        ) from None
    return _identity(node, "ca", ca_cert, key, cert)


def load_identity(
    node: str,
    *,
    secret_file: Path | None,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
) -> Identity:
    """The identity the configuration asks for (config.py ensures exactly one mode)."""
    if ca_file is not None and cert_file is not None and key_file is not None:
        return identity_from_files(ca_file, cert_file, key_file, node)
    if secret_file is None:
        raise IdentityError(
            "no cluster.secret_file and no [tls] files: nothing to prove who we are"
        )
    try:
        secret = load_secret(secret_file)
    except SecretError as e:
        raise IdentityError(str(e)) from None
    return identity_from_secret(secret, node)


def peer_names(ssl_object: Any) -> tuple[str, ...]:
    """The names of the verified certificate on the other end of a TLS connection
    (SAN DNS names, else the CN); () when there is none."""
    if ssl_object is None:
        return ()
    try:
        cert = ssl_object.getpeercert()
    except (ValueError, AttributeError):
        return ()
    if not cert:
        return ()
    dns = tuple(v for k, v in cert.get("subjectAltName", ()) if k == "DNS")
    if dns:
        return dns
    return tuple(v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName")
