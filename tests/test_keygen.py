"""`silotune keygen` writes keys Flower and silotune accept, and never overwrites any."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from silotune.cli import app
from silotune.crypto.identity import IdentityKey, PublicIdentity
from silotune.errors import ConfigError
from silotune.federated.pinning import SiloTrust
from silotune.keygen import generate
from silotune.transport.tls import load_tls_material


def test_keygen_writes_usable_tls_and_supernode_keys(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["keygen", "--out", str(tmp_path / "k"), "--silos", "2"])
    assert result.exit_code == 0, result.output
    root = tmp_path / "k"
    server = load_tls_material(root / "coordinator", role="server")
    assert server.server_key_pem is not None
    registered = (root / "coordinator" / "supernodes.txt").read_bytes().splitlines()
    assert len(registered) == 2
    for k, line in enumerate(registered):
        silo = root / f"silo-{k}"
        assert (silo / "ca.pem").read_bytes() == server.ca_cert_pem
        private = load_ssh_private_key((silo / "supernode.key").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert load_ssh_public_key(line).public_numbers() == private.public_key().public_numbers()
        for secret in ("supernode.key", "identity.pem"):
            assert stat.S_IMODE((silo / secret).stat().st_mode) == 0o600
        identity = IdentityKey.load(silo / "identity.pem")
        assert PublicIdentity.load(silo / "identity.pub") == identity.public
        trust = SiloTrust.from_files(str(silo / "identity.pem"), str(silo / "enrollment.json"))
        assert trust.name == f"silo-{k}"


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    generate(tmp_path, 1, ["localhost"])
    before = (tmp_path / "silo-0" / "supernode.key").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        generate(tmp_path, 1, ["localhost"])
    assert (tmp_path / "silo-0" / "supernode.key").read_bytes() == before


def test_keygen_folders_serve_split_mode_too(tmp_path: Path) -> None:
    """One keygen for every mode: each party's folder is its split.keys_dir and split.tls_dir."""
    from silotune.split.keys import load_coordinator_keys, load_enrollment, load_silo_keys

    generate(tmp_path, 2, ["localhost"])
    identity, enrollment = load_coordinator_keys(tmp_path / "coordinator")
    assert enrollment.names() == ["silo-0", "silo-1"]
    load_tls_material(tmp_path / "coordinator", role="server")
    for k in range(2):
        folder = tmp_path / f"silo-{k}"
        key, pinned = load_silo_keys(folder, f"silo-{k}")
        assert pinned == identity.public  # the silo pins the coordinator this keygen made
        assert enrollment.name_of(key.public) == f"silo-{k}"
        assert load_enrollment(folder, "silo").names() == enrollment.names()
        assert load_tls_material(folder, role="client").ca_cert_pem
