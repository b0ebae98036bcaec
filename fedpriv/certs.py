"""Certificates and keys for a deployment: a CA, the SuperLink's TLS certificate, and one
SuperNode authentication key pair per hospital.

- ``ca.crt`` / ``ca.key``: the federation's certificate authority (keep ``ca.key`` offline).
- ``superlink.crt`` / ``superlink.key``: the SuperLink's TLS certificate for the given host
  names and IP addresses (subject alternative names), signed by the CA.
- ``supernodes/<hospital>`` / ``<hospital>.pub``: each hospital's SuperNode key pair (EC P-384,
  OpenSSH format); the coordinator registers the public key with
  ``flwr supernode register``, the private key never leaves the hospital.

Every file is written mode 0600 and none is ever overwritten.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path

from fedpriv.errors import ConfigError

__all__ = ["CertFiles", "init_certs"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclasses.dataclass(frozen=True)
class CertFiles:
    ca_certificate: Path
    ca_key: Path
    superlink_certificate: Path
    superlink_key: Path
    supernode_keys: dict[str, tuple[Path, Path]]  # hospital -> (private, public)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def init_certs(
    out: str | Path, *, hosts: Sequence[str], hospitals: Sequence[str], days: int = 365
) -> CertFiles:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ConfigError("give at least one --host the hospitals use to reach the SuperLink")
    for name in hospitals:
        if not _NAME.match(name):
            raise ConfigError(
                f"hospital name {name!r}: use letters, digits, '.', '_' and '-' (max 63)"
            )
    if len(set(hospitals)) != len(hospitals):
        raise ConfigError("hospital names must be distinct")
    directory = Path(out)
    targets = [directory / n for n in ("ca.crt", "ca.key", "superlink.crt", "superlink.key")]
    targets += [directory / "supernodes" / h for h in hospitals]
    existing = [t for t in targets if t.exists()]
    if existing:
        raise ConfigError(f"'{existing[0]}' already exists: certificates are never overwritten")
    (directory / "supernodes").mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.UTC)
    pem = serialization.Encoding.PEM
    no_password = serialization.NoEncryption()

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpriv federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    link_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    link_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(link_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    _write_private(directory / "ca.crt", ca_cert.public_bytes(pem))
    _write_private(
        directory / "ca.key",
        ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_password),
    )
    _write_private(directory / "superlink.crt", link_cert.public_bytes(pem))
    _write_private(
        directory / "superlink.key",
        link_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_password),
    )
    keys: dict[str, tuple[Path, Path]] = {}
    for hospital in hospitals:
        private = ec.generate_private_key(ec.SECP384R1())
        private_path = directory / "supernodes" / hospital
        public_path = directory / "supernodes" / f"{hospital}.pub"
        _write_private(
            private_path,
            private.private_bytes(pem, serialization.PrivateFormat.OpenSSH, no_password),
        )
        _write_private(
            public_path,
            private.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            + f" {hospital}\n".encode(),
        )
        keys[hospital] = (private_path, public_path)
    return CertFiles(
        ca_certificate=directory / "ca.crt",
        ca_key=directory / "ca.key",
        superlink_certificate=directory / "superlink.crt",
        superlink_key=directory / "superlink.key",
        supernode_keys=keys,
    )
