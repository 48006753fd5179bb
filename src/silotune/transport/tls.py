"""TLS material for gRPC: a self-signed CA and a server certificate it signs, written and loaded.

``generate_tls_material`` writes ``ca.pem``, ``ca.key``, ``server.pem`` and ``server.key`` (keys
mode 0600). A coordinator loads all of them (``role="server"``); a silo needs only ``ca.pem``
(``role="client"``). These certificates protect the gRPC hop; silo identities and the end-to-end
AEAD keys come from ``silotune.crypto`` and are independent of them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from silotune.errors import TlsMaterialError
from silotune.files import atomic_write

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "TlsMaterial",
    "TlsMaterialError",
    "generate_tls_material",
    "load_tls_material",
]

log = logging.getLogger(__name__)

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
_FILES = (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes for gRPC credentials.

    ``server_cert_pem`` and ``server_key_pem`` are ``None`` when loaded for the client role.
    """

    ca_cert_pem: bytes
    server_cert_pem: bytes | None = None
    server_key_pem: bytes | None = None


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(hosts, str) or not hosts:
        raise ValueError("hosts must be a non-empty list of DNS names or IP addresses.")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not isinstance(host, str) or len(host) > 253 or not _HOSTNAME.match(host):
                raise ValueError(
                    f"Host {host!r} is neither an IP address nor a valid DNS name."
                ) from None
            names.append(x509.DNSName(host))
    return names


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "silotune"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def generate_tls_material(
    out_dir: str | os.PathLike[str],
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
    *,
    overwrite: bool = False,
) -> TlsMaterial:
    """Create a self-signed CA and a server certificate for ``hosts`` signed by it.

    Parameters
    ----------
    out_dir
        Folder to write ``ca.pem``, ``ca.key``, ``server.pem`` and ``server.key`` to (created if
        missing). Private keys get mode 0600.
    hosts
        DNS names and IP addresses the server certificate is valid for (SubjectAlternativeName).
    days
        Validity of both certificates, 1 to 3650 days.
    overwrite
        Replace existing files; by default existing material is never touched.

    Returns
    -------
    TlsMaterial
        The CA certificate and the server certificate and key, as PEM.

    Raises
    ------
    ValueError
        If ``hosts`` or ``days`` is invalid.
    TlsMaterialError
        If material already exists in ``out_dir`` and ``overwrite`` is false.
    """
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 3650:
        raise ValueError(f"days must be an int from 1 to 3650, got {days!r}.")
    san = _san_entries(hosts)
    folder = Path(out_dir)
    existing = [name for name in _FILES if (folder / name).exists()]
    if existing and not overwrite:
        raise TlsMaterialError(
            f"TLS material already exists in {folder} ({', '.join(existing)}); "
            "pass overwrite=True to replace it."
        )
    folder.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.timezone.utc)
    not_before = now - dt.timedelta(minutes=5)  # tolerate small clock skew between machines
    not_after = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("silotune CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
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
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(str(hosts[0])))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
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
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    material = TlsMaterial(
        ca_cert_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        server_cert_pem=server_cert.public_bytes(serialization.Encoding.PEM),
        server_key_pem=_key_pem(server_key),
    )
    # Keys first, certificates last: a reader never finds a certificate without its key.
    atomic_write(folder / CA_KEY, _key_pem(ca_key), 0o600)
    atomic_write(folder / SERVER_KEY, material.server_key_pem or b"", 0o600)
    atomic_write(folder / CA_CERT, material.ca_cert_pem, 0o644)
    atomic_write(folder / SERVER_CERT, material.server_cert_pem or b"", 0o644)
    log.info("Wrote TLS CA and server certificate for %s to %s.", ", ".join(hosts), folder)
    return material


def _read(folder: Path, name: str, role: str) -> bytes:
    path = folder / name
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsMaterialError(
            f"TLS file {path} is missing (the {role} role needs "
            f"{', '.join(_needed(role))}); create it with `silotune keygen`."
        ) from None
    except OSError as exc:
        raise TlsMaterialError(f"TLS file {path} cannot be read: {exc.strerror}.") from None


def _needed(role: str) -> tuple[str, ...]:
    return (CA_CERT,) if role == "client" else (CA_CERT, SERVER_CERT, SERVER_KEY)


def load_tls_material(
    directory: str | os.PathLike[str], role: Literal["server", "client"] = "server"
) -> TlsMaterial:
    """Load and check the TLS files a server or a client needs.

    Parameters
    ----------
    directory
        Folder written by :func:`generate_tls_material`; a client's may hold only ``ca.pem``.
    role
        ``"server"`` loads ``ca.pem``, ``server.pem`` and ``server.key``; ``"client"`` loads
        only ``ca.pem``.

    Returns
    -------
    TlsMaterial
        The PEM bytes.

    Raises
    ------
    TlsMaterialError
        If a file is missing or malformed, the server certificate is not signed by the CA or has
        expired, or the key does not match the certificate.
    """
    if role not in ("server", "client"):
        raise ValueError(f"role must be 'server' or 'client', got {role!r}.")
    folder = Path(directory)
    if not folder.is_dir():
        raise TlsMaterialError(
            f"TLS folder {folder} does not exist; create it with `silotune keygen`."
        )
    ca_pem = _read(folder, CA_CERT, role)
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise TlsMaterialError(f"{folder / CA_CERT} is not a PEM certificate.") from None
    if role == "client":
        return TlsMaterial(ca_cert_pem=ca_pem)

    cert_pem = _read(folder, SERVER_CERT, role)
    key_pem = _read(folder, SERVER_KEY, role)
    key_path = folder / SERVER_KEY
    if os.name == "posix" and key_path.stat().st_mode & 0o077:
        log.warning("%s is readable by other users; run `chmod 600 %s`.", key_path, key_path)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise TlsMaterialError(f"{folder / SERVER_CERT} is not a PEM certificate.") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TlsMaterialError(
            f"{key_path} is not an unencrypted PEM private key (gRPC needs one without password)."
        ) from None
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise TlsMaterialError(f"{key_path} does not match the certificate in {SERVER_CERT}.")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise TlsMaterialError(
            f"{folder / SERVER_CERT} is not signed by the CA in {folder / CA_CERT} ({exc})."
        ) from None
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise TlsMaterialError(
            f"{folder / SERVER_CERT} is valid from {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}, not now; regenerate it with `silotune keygen`."
        )
    return TlsMaterial(ca_cert_pem=ca_pem, server_cert_pem=cert_pem, server_key_pem=key_pem)
