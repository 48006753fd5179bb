"""Tests for identity keys, their PEM files and fingerprints, and the enrollment allow-list."""

import hashlib
import json
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from silotune.crypto.exceptions import AuthenticationError, KeyMaterialError, UnknownIdentityError
from silotune.crypto.identity import Enrollment, IdentityKey, PublicIdentity, fingerprint

SEED = b"\x01" * 32


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_known_answer_public_key_and_fingerprint():
    # RFC 8032 key derivation from a fixed seed; the fingerprint is sha256(raw)[:8] in hex.
    key = IdentityKey.from_private_bytes(SEED)
    raw = key.public_bytes()
    assert raw.hex() == "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
    assert key.fingerprint() == "34750f98bd59fcfc"
    assert key.fingerprint() == hashlib.sha256(raw).hexdigest()[:16] == fingerprint(raw)


def test_generate_sign_verify():
    key = IdentityKey.generate()
    assert len(key.public_bytes()) == 32
    signature = key.sign(b"transcript")
    assert len(signature) == 64
    key.public.verify(signature, b"transcript")  # raises on failure
    with pytest.raises(AuthenticationError, match=key.fingerprint()):
        key.public.verify(signature, b"transcripT")
    bad = bytes([signature[0] ^ 1]) + signature[1:]
    with pytest.raises(AuthenticationError):
        key.public.verify(bad, b"transcript")
    with pytest.raises(AuthenticationError):
        IdentityKey.generate().public.verify(signature, b"transcript")


def test_repr_shows_no_secret():
    key = IdentityKey.from_private_bytes(SEED)
    assert SEED.hex() not in repr(key)
    assert key.fingerprint() in repr(key)


def test_private_key_file_round_trip_mode_0600(tmp_path):
    key = IdentityKey.generate()
    path = tmp_path / "silo.key"
    old_umask = os.umask(0)  # even with a permissive umask the file must be 0600
    try:
        key.save(path)
    finally:
        os.umask(old_umask)
    assert _mode(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert IdentityKey.load(path).public == key.public
    assert os.listdir(tmp_path) == ["silo.key"]  # no temporary file left behind


def test_save_never_replaces_an_existing_key_unless_asked(tmp_path):
    path = tmp_path / "silo.key"
    first, second = IdentityKey.generate(), IdentityKey.generate()
    first.save(path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        second.save(path)
    assert IdentityKey.load(path).public == first.public  # untouched
    second.save(path, overwrite=True)
    assert IdentityKey.load(path).public == second.public
    assert _mode(path) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["silo.key"]


def test_password_protected_key(tmp_path):
    key = IdentityKey.generate()
    path = tmp_path / "silo.key"
    key.save(path, password=b"correct horse")
    assert b"ENCRYPTED" in path.read_bytes()
    assert IdentityKey.load(path, password=b"correct horse").public == key.public
    with pytest.raises(KeyMaterialError):
        IdentityKey.load(path, password=b"wrong")
    with pytest.raises(KeyMaterialError):
        IdentityKey.load(path)


def test_load_refuses_a_key_others_can_read(tmp_path):
    path = tmp_path / "silo.key"
    IdentityKey.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyMaterialError, match="chmod 600"):
        IdentityKey.load(path)


def test_load_refuses_a_non_ed25519_key(tmp_path):
    pem = X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(KeyMaterialError, match="Ed25519"):
        IdentityKey.from_pem(pem)
    public_pem = (
        X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(KeyMaterialError, match="Ed25519"):
        PublicIdentity.from_pem(public_pem)
    with pytest.raises(KeyMaterialError):
        IdentityKey.from_pem(
            b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n"
        )


def test_public_identity_encodings_agree(tmp_path):
    key = IdentityKey.generate()
    public = key.public
    assert PublicIdentity.from_bytes(public.public_bytes()) == public
    assert PublicIdentity.from_hex(public.hex()) == public
    assert PublicIdentity.from_hex(public.hex().upper() + "\n") == public
    assert PublicIdentity.from_pem(public.to_pem()) == public
    path = tmp_path / "silo.pub"
    public.save(path)
    assert _mode(path) == 0o644
    assert PublicIdentity.load(path) == public
    assert hash(PublicIdentity.from_bytes(public.public_bytes())) == hash(public)
    assert public != IdentityKey.generate().public


def test_public_identity_rejects_bad_material():
    with pytest.raises(KeyMaterialError, match="32 bytes, got 31"):
        PublicIdentity.from_bytes(b"\x00" * 31)
    with pytest.raises(KeyMaterialError, match="not hex"):
        PublicIdentity.from_hex("zz" * 32)
    with pytest.raises(KeyMaterialError, match="32 bytes"):
        PublicIdentity.from_hex("ab" * 16)
    with pytest.raises(KeyMaterialError):
        PublicIdentity.from_pem(b"garbage")
    with pytest.raises(TypeError):
        PublicIdentity.from_bytes("not bytes")  # type: ignore[arg-type]
    with pytest.raises(KeyMaterialError, match="32 bytes"):
        IdentityKey.from_private_bytes(b"\x00" * 16)


# --- enrollment -------------------------------------------------------------------------------


def test_enrollment_lookup_both_ways():
    alice, bob = IdentityKey.generate(), IdentityKey.generate()
    enrollment = Enrollment({"alice": alice.public, "bob": bob.public_bytes()})
    assert enrollment.names() == ["alice", "bob"] and len(enrollment) == 2
    assert "alice" in enrollment and "carol" not in enrollment
    assert enrollment.get("bob") == bob.public
    assert enrollment.name_of(alice.public) == "alice"
    assert enrollment.name_of(bob.public_bytes()) == "bob"


def test_enrollment_unknown_identity_names_the_fingerprint():
    enrollment = Enrollment({"alice": IdentityKey.generate().public})
    stranger = IdentityKey.generate()
    with pytest.raises(UnknownIdentityError, match=stranger.fingerprint()):
        enrollment.name_of(stranger.public)
    with pytest.raises(UnknownIdentityError, match="carol"):
        enrollment.get("carol")


def test_enrollment_rejects_duplicates_and_bad_names():
    alice = IdentityKey.generate()
    enrollment = Enrollment({"alice": alice.public})
    with pytest.raises(ValueError, match="already enrolled as 'alice'"):
        enrollment.add("alias", alice.public)
    with pytest.raises(ValueError, match="already enrolled"):
        enrollment.add("alice", IdentityKey.generate().public)
    for bad in ["", "has space", "../etc", "-leading-dash", "x" * 65]:
        with pytest.raises(ValueError, match="not allowed"):
            enrollment.add(bad, IdentityKey.generate().public)


def test_enrollment_remove():
    alice = IdentityKey.generate()
    enrollment = Enrollment({"alice": alice.public})
    enrollment.remove("alice")
    with pytest.raises(UnknownIdentityError):
        enrollment.name_of(alice.public)
    enrollment.add("alice-2", alice.public)  # the key is free again
    with pytest.raises(UnknownIdentityError):
        enrollment.remove("alice")


def test_enrollment_file_round_trip(tmp_path):
    keys = {name: IdentityKey.generate() for name in ["hospital-b", "hospital-a"]}
    enrollment = Enrollment({name: key.public for name, key in keys.items()})
    path = tmp_path / "enrollment.json"
    enrollment.save(path)
    document = json.loads(path.read_text())
    assert document["format"] == "silotune-enrollment"
    assert document["version"] == 1
    assert list(document["silos"]) == ["hospital-a", "hospital-b"]
    assert document["silos"]["hospital-a"] == keys["hospital-a"].public.hex()
    loaded = Enrollment.load(path)
    assert loaded.names() == ["hospital-a", "hospital-b"]
    for name, key in keys.items():
        assert loaded.name_of(key.public) == name
    loaded.add("hospital-c", IdentityKey.generate().public)
    loaded.save(path)  # replacing an enrollment is a normal update
    assert Enrollment.load(path).names() == ["hospital-a", "hospital-b", "hospital-c"]
    assert os.listdir(tmp_path) == ["enrollment.json"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not valid JSON"),
        ('{"version": 1, "silos": {}}', "format"),
        ('{"format": "silotune-enrollment", "version": 2, "silos": {}}', "version 2"),
        ('{"format": "silotune-enrollment", "version": 1, "silos": []}', "'silos'"),
        ('{"format": "silotune-enrollment", "version": 1, "silos": {"a": 5}}', "hex string"),
        ('{"format": "silotune-enrollment", "version": 1, "silos": {"a": "abcd"}}', "32 bytes"),
        (
            '{"format": "silotune-enrollment", "version": 1, "silos": {"a b": "'
            + "00" * 32
            + '"}}',
            "not allowed",
        ),
    ],
)
def test_enrollment_file_errors_name_the_problem(tmp_path, text, message):
    path = tmp_path / "enrollment.json"
    path.write_text(text)
    with pytest.raises(KeyMaterialError, match=message) as excinfo:
        Enrollment.load(path)
    assert str(path) in str(excinfo.value)


def test_enrollment_file_rejects_a_name_listed_twice():
    key_a, key_b = IdentityKey.generate().public.hex(), IdentityKey.generate().public.hex()
    text = (
        '{"format": "silotune-enrollment", "version": 1, '
        f'"silos": {{"a": "{key_a}", "a": "{key_b}"}}}}'
    )
    with pytest.raises(KeyMaterialError, match="appears twice"):
        Enrollment.from_json(text)
