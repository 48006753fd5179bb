"""`silotune keygen`: every key and certificate of a deployment, for every mode, one folder per party.

Layout written under ``--out`` (silos are named ``silo-0`` ... like in simulation and split)::

    coordinator/ca.pem ca.key server.pem server.key   TLS server (flower-superlink, silotune serve)
    coordinator/supernodes.txt                         the silos' SuperNode public keys, to register
    coordinator/coordinator.key, coordinator.pub       the coordinator's Ed25519 identity (split)
    coordinator/enrollment.json                        every silo's public identity
    silo-<k>/ca.pem                                    pins the coordinator's CA
    silo-<k>/supernode.key, supernode.pub              SuperNode authentication (ECDSA P-384,
                                                       OpenSSH format, as flower-supernode wants)
    silo-<k>/identity.pem, identity.pub                the silo's Ed25519 silotune identity
    silo-<k>/enrollment.json                           every silo's public identity
    silo-<k>/coordinator.pub                           the coordinator identity a split silo pins

Each party then points its config at its own folder: federated silos set
``federation.identity_key: silo-<k>/identity.pem`` and ``federation.enrollment``; in split mode
``split.keys_dir`` and ``split.tls_dir`` are the party's folder. Private keys are written 0600;
nothing is overwritten: an existing file makes the command stop before writing anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from silotune.crypto.identity import Enrollment, IdentityKey
from silotune.errors import ConfigError
from silotune.files import atomic_write
from silotune.transport.tls import CA_CERT, generate_tls_material

SUPERNODE_KEY, SUPERNODE_PUB = "supernode.key", "supernode.pub"
IDENTITY_KEY, IDENTITY_PUB = "identity.pem", "identity.pub"
COORDINATOR_KEY, COORDINATOR_PUB = "coordinator.key", "coordinator.pub"
ENROLLMENT = "enrollment.json"


def supernode_keypair() -> tuple[bytes, bytes]:
    """An ECDSA P-384 key pair in OpenSSH format (private, public)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


def generate(out: Path, silos: int, hosts: list[str], days: int = 365) -> list[Path]:
    """Write the coordinator's TLS material and each silo's keys; returns the files written."""
    if silos < 1:
        raise ConfigError(f"--silos must be at least 1, got {silos}")
    coordinator = out / "coordinator"
    silo_dirs = [out / f"silo-{k}" for k in range(silos)]
    planned = [coordinator / n for n in ("ca.pem", "ca.key", "server.pem", "server.key")]
    planned += [coordinator / n for n in ("supernodes.txt", COORDINATOR_KEY, COORDINATOR_PUB)]
    planned.append(coordinator / ENROLLMENT)
    for d in silo_dirs:
        planned += [
            d / n
            for n in (CA_CERT, SUPERNODE_KEY, SUPERNODE_PUB, IDENTITY_KEY, IDENTITY_PUB)
            + (ENROLLMENT, COORDINATOR_PUB)
        ]
    existing = [p for p in planned if p.exists()]
    if existing:
        raise ConfigError(f"keygen: {existing[0]} already exists; choose an empty --out folder")
    try:
        tls = generate_tls_material(coordinator, hosts, days)
    except ValueError as err:
        raise ConfigError(f"keygen: {err}") from None
    registered = []
    enrollment = Enrollment()
    for d in silo_dirs:
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / CA_CERT, tls.ca_cert_pem, 0o644)
        private, public = supernode_keypair()
        atomic_write(d / SUPERNODE_KEY, private, 0o600)
        atomic_write(d / SUPERNODE_PUB, public, 0o644)
        identity = IdentityKey.generate()
        identity.save(d / IDENTITY_KEY)
        identity.public.save(d / IDENTITY_PUB)
        enrollment.add(d.name, identity.public)
        registered.append(public)
    leader = IdentityKey.generate()
    leader.save(coordinator / COORDINATOR_KEY)
    leader.public.save(coordinator / COORDINATOR_PUB)
    for d in [coordinator, *silo_dirs]:
        enrollment.save(d / ENROLLMENT)
    for d in silo_dirs:
        leader.public.save(d / COORDINATOR_PUB)
    atomic_write(coordinator / "supernodes.txt", b"".join(registered), 0o644)
    return planned


def keygen(
    out: Annotated[Path, typer.Option("--out", help="Empty folder to write the keys to.")],
    silos: Annotated[int, typer.Option(help="Number of silos to make keys for.")] = 2,
    host: Annotated[
        list[str] | None,
        typer.Option(help="Coordinator DNS name or IP for its certificate (repeatable)."),
    ] = None,
    days: Annotated[int, typer.Option(help="Certificate validity in days.")] = 365,
) -> None:
    """Create every key of a deployment (TLS, SuperNode, identities) in one folder per party."""
    files = generate(out, silos, host or ["localhost", "127.0.0.1"], days)
    typer.echo(f"wrote {len(files)} files under {out} (private keys mode 0600)")
