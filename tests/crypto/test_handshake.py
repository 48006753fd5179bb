"""Tests for the authenticated X25519 handshake: known answers, round trip, every rejection."""

import hashlib
import hmac
import itertools
import os
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from silotune.crypto import handshake
from silotune.crypto.channel import SecureChannel
from silotune.crypto.exceptions import HandshakeError, KeyMaterialError, UnknownIdentityError
from silotune.crypto.handshake import (
    CONFIRM_SIZE,
    HELLO_SIZE,
    RESPONSE_SIZE,
    Cipher,
    ClientHandshake,
    ClientHello,
    ServerHandshake,
    key_schedule,
    transcript_hash,
)
from silotune.crypto.identity import Enrollment, IdentityKey, PublicIdentity

CLIENT_SEED, SERVER_SEED = b"\x01" * 32, b"\x02" * 32

# Fixed transcript fields for the known-answer tests.
TRANSCRIPT_FIELDS = {
    "cipher": Cipher.AES_256_GCM,
    "context": b"job-42",
    "client_identity": bytes(range(0, 32)),
    "client_ephemeral": bytes(range(32, 64)),
    "client_nonce": b"\x11" * 32,
    "server_identity": bytes(range(64, 96)),
    "server_ephemeral": bytes(range(96, 128)),
    "server_nonce": b"\x22" * 32,
}
EXPECTED_TRANSCRIPT_HASH = "cb27c8ea0c8a3b98b978027846f5becd8233677b63917d4d18db957845ea7ef6"


def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 written out with hmac, independent of the library under test."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block = b"", b""
    for counter in itertools.count(1):
        if len(out) >= length:
            break
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
    return out[:length]


@pytest.fixture
def parties():
    client, server = IdentityKey.generate(), IdentityKey.generate()
    return client, server, Enrollment({"hospital-a": client.public})


def _run(client_hs, server_hs):
    response = server_hs.respond(client_hs.hello())
    client_keys, confirm = client_hs.finish(response)
    return client_keys, server_hs.finish(confirm)


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# --- known answers ------------------------------------------------------------------------------


def test_transcript_hash_known_answer_and_spec():
    assert transcript_hash(**TRANSCRIPT_FIELDS).hex() == EXPECTED_TRANSCRIPT_HASH
    f = TRANSCRIPT_FIELDS
    spelled_out = (
        b"silotune/handshake/v1"
        + struct.pack(">BBI", 1, 1, len(f["context"]))
        + f["context"]
        + b"client" + f["client_identity"] + f["client_ephemeral"] + f["client_nonce"]
        + b"server" + f["server_identity"] + f["server_ephemeral"] + f["server_nonce"]
    )  # fmt: skip
    assert hashlib.sha256(spelled_out).hexdigest() == EXPECTED_TRANSCRIPT_HASH


def test_transcript_hash_binds_every_field():
    base = transcript_hash(**TRANSCRIPT_FIELDS)
    for name, value in TRANSCRIPT_FIELDS.items():
        if name == "cipher":
            changed = Cipher.CHACHA20_POLY1305
        elif name == "context":
            changed = b"job-43"
        else:
            changed = _flip(value, 31)
        assert transcript_hash(**{**TRANSCRIPT_FIELDS, name: changed}) != base, name


def test_key_schedule_known_answer():
    th = bytes.fromhex(EXPECTED_TRANSCRIPT_HASH)
    secrets = key_schedule(b"\x33" * 32, th)
    assert secrets.client_to_server.hex() == (
        "604dc6e519c65dc5832ec686efb769fc9ac3cc796a606c96489564afdda37c13"
    )
    assert secrets.server_to_client.hex() == (
        "f94266733208735a37fc129ac7162919bf95f86c58323afe5290123d7ac98006"
    )
    assert secrets.session_id.hex() == (
        "7abf714339826149f4d95aec6be0f11c1f14a9220600f487d3a02c05e135c27d"
    )
    assert secrets.confirm_key.hex() == (
        "0ebaab212a8a743e799325b28df87a912b896347c0625edbfde4d5e6b48fb30f"
    )
    # The same bytes from RFC 5869 HKDF written out independently (salt = TH, info = label).
    okm = _hkdf_sha256(b"\x33" * 32, th, b"silotune/handshake/v1 keys", 128)
    assert okm == b"".join(secrets)


def test_hello_wire_layout():
    hello = ClientHello(Cipher.CHACHA20_POLY1305, b"\xaa" * 32, b"\xbb" * 32, b"\xcc" * 32)
    wire = hello.to_bytes()
    assert wire == b"STHS\x01\x01\x02" + b"\xaa" * 32 + b"\xbb" * 32 + b"\xcc" * 32
    assert len(wire) == HELLO_SIZE == 103
    assert ClientHello.from_bytes(wire) == hello


def test_full_handshake_known_answer(monkeypatch):
    """Fixed identities, ephemerals and nonces -> fixed messages, session id and first frame."""
    ephemerals = iter([b"\x03" * 32, b"\x04" * 32])  # client's, then server's
    nonces = iter([b"\x05" * 32, b"\x06" * 32])

    class FixedX25519:
        @staticmethod
        def generate():
            return X25519PrivateKey.from_private_bytes(next(ephemerals))

    monkeypatch.setattr(handshake, "X25519PrivateKey", FixedX25519)
    monkeypatch.setattr(handshake.os, "urandom", lambda n: next(nonces))
    client = IdentityKey.from_private_bytes(CLIENT_SEED)
    server = IdentityKey.from_private_bytes(SERVER_SEED)
    client_hs = ClientHandshake(client, server.public, context=b"job-42")
    server_hs = ServerHandshake(server, Enrollment({"a": client.public}), context=b"job-42")
    hello = client_hs.hello()
    response = server_hs.respond(hello)
    client_keys, confirm = client_hs.finish(response)
    server_keys = server_hs.finish(confirm)
    assert hello[:7] == b"STHS\x01\x01\x01" and hello[7:39] == client.public_bytes()
    assert hello[71:] == b"\x05" * 32
    digest = hashlib.sha256(hello + response + confirm).hexdigest()
    assert digest == "f1397cfafb8ac50baabbb16fb136fec55d75a014093f372185e09a9151517829"
    assert (
        client_keys.session_id.hex()
        == server_keys.session_id.hex()
        == ("b603e5fc0db9be790f8851a8b979122d5b66aa98ca0571199836133b11a91313")
    )
    frame = SecureChannel(client_keys, "client").seal(b"silotune")
    assert frame.hex() == (
        "0101000000000000000000000000928f978ec42638189221d4ac87c196c3466d33a5279a0ee7"
    )


# --- round trip -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cipher", list(Cipher))
def test_handshake_then_channel_round_trip(parties, cipher):
    client, server, enrollment = parties
    client_keys, server_keys = _run(
        ClientHandshake(client, server.public, cipher=cipher, context=b"job-7"),
        ServerHandshake(server, enrollment, context=b"job-7"),
    )
    assert client_keys.session_id == server_keys.session_id
    assert len(client_keys.session_id) == 32
    assert client_keys.cipher is server_keys.cipher is cipher
    assert server_keys.client_name == "hospital-a"
    assert server_keys.client_identity == client_keys.client_identity == client.public
    assert server_keys.server_identity == client_keys.server_identity == server.public
    silo, coordinator = SecureChannel(client_keys, "client"), SecureChannel(server_keys, "server")
    for i in range(3):
        assert coordinator.open(silo.seal(b"activations %d" % i)) == b"activations %d" % i
        assert silo.open(coordinator.seal(b"gradients %d" % i)) == b"gradients %d" % i


def test_message_sizes_and_fresh_keys_per_handshake(parties):
    client, server, enrollment = parties
    client_hs, server_hs = (
        ClientHandshake(client, server.public),
        ServerHandshake(server, enrollment),
    )
    hello = client_hs.hello()
    response = server_hs.respond(hello)
    keys, confirm = client_hs.finish(response)
    assert (len(hello), len(response), len(confirm)) == (HELLO_SIZE, RESPONSE_SIZE, CONFIRM_SIZE)
    server_hs.finish(confirm)
    other, _ = _run(ClientHandshake(client, server.public), ServerHandshake(server, enrollment))
    assert other.session_id != keys.session_id


def test_session_keys_repr_hides_secrets(parties):
    client, server, enrollment = parties
    keys, _ = _run(ClientHandshake(client, server.public), ServerHandshake(server, enrollment))
    text = repr(keys)
    assert keys._client_to_server.hex()[:16] not in text
    assert keys._server_to_client.hex()[:16] not in text
    assert client.fingerprint() in text


# --- rejections -----------------------------------------------------------------------------------


def test_unknown_client_is_rejected_before_any_response(parties):
    _, server, enrollment = parties
    stranger = IdentityKey.generate()
    server_hs = ServerHandshake(server, enrollment)
    with pytest.raises(UnknownIdentityError, match=stranger.fingerprint()):
        server_hs.respond(ClientHandshake(stranger, server.public).hello())


def test_wrong_pinned_server_key(parties):
    client, server, enrollment = parties
    impostor = IdentityKey.generate()  # signs correctly, but with its own key
    client_hs = ClientHandshake(client, server.public)
    response = ServerHandshake(impostor, enrollment).respond(client_hs.hello())
    with pytest.raises(UnknownIdentityError, match="pinned") as excinfo:
        client_hs.finish(response)
    assert impostor.fingerprint() in str(excinfo.value)
    assert server.fingerprint() in str(excinfo.value)


def test_pin_accepts_a_key_from_raw_bytes(parties):
    """An attestation quote carries the enclave's raw Ed25519 public key; pin exactly that."""
    client, server, enrollment = parties
    quoted = PublicIdentity.from_bytes(server.public_bytes())
    keys, _ = _run(ClientHandshake(client, quoted), ServerHandshake(server, enrollment))
    assert keys.server_identity == server.public


@pytest.mark.parametrize(
    ("message", "index", "match"),
    [
        ("hello", 4, "version 0 is not supported"),
        ("response", 4, "version 0 is not supported"),
        ("confirm", 4, "version 0 is not supported"),
        ("hello", 0, "not a silotune handshake"),
        ("hello", 5, "expected a handshake hello"),
        ("hello", 6, "cipher"),
    ],
)
def test_bad_header_fields(parties, message, index, match):
    client, server, enrollment = parties
    client_hs, server_hs = (
        ClientHandshake(client, server.public),
        ServerHandshake(server, enrollment),
    )
    hello = client_hs.hello()
    if message == "hello":
        with pytest.raises(HandshakeError, match=match):
            server_hs.respond(_flip(hello, index))
        return
    response = server_hs.respond(hello)
    if message == "response":
        with pytest.raises(HandshakeError, match=match):
            client_hs.finish(_flip(response, index))
        return
    _, confirm = client_hs.finish(response)
    with pytest.raises(HandshakeError, match=match):
        server_hs.finish(_flip(confirm, index))


def test_bad_lengths(parties):
    client, server, enrollment = parties
    hello = ClientHandshake(client, server.public).hello()
    with pytest.raises(HandshakeError, match="must be 103 bytes"):
        ServerHandshake(server, enrollment).respond(hello + b"\x00")
    with pytest.raises(HandshakeError, match="must be 103 bytes"):
        ServerHandshake(server, enrollment).respond(hello[:-1])
    with pytest.raises(HandshakeError, match="too short"):
        ServerHandshake(server, enrollment).respond(b"ST")
    with pytest.raises(TypeError):
        ServerHandshake(server, enrollment).respond("hello")


@pytest.mark.parametrize("index", [7 + 32, 7 + 64, 7 + 96, RESPONSE_SIZE - 1])
def test_tampered_response_fails_the_signature(parties, index):
    """Flip a bit in the server's ephemeral key, its nonce, or its signature."""
    client, server, enrollment = parties
    client_hs = ClientHandshake(client, server.public)
    response = ServerHandshake(server, enrollment).respond(client_hs.hello())
    with pytest.raises(HandshakeError, match="signature"):
        client_hs.finish(_flip(response, index))


@pytest.mark.parametrize(("index", "match"), [(6, "signature"), (CONFIRM_SIZE - 1, "confirmation")])
def test_tampered_confirm(parties, index, match):
    client, server, enrollment = parties
    client_hs, server_hs = (
        ClientHandshake(client, server.public),
        ServerHandshake(server, enrollment),
    )
    _, confirm = client_hs.finish(server_hs.respond(client_hs.hello()))
    with pytest.raises(HandshakeError, match=match):
        server_hs.finish(_flip(confirm, index))


def test_man_in_the_middle_swapping_the_ephemeral_key(parties):
    client, server, enrollment = parties
    client_hs = ClientHandshake(client, server.public)
    hello = client_hs.hello()
    attacker_ephemeral = os.urandom(32)
    forged = hello[:39] + attacker_ephemeral + hello[71:]
    response = ServerHandshake(server, enrollment).respond(forged)
    with pytest.raises(HandshakeError, match="signature"):
        client_hs.finish(response)


def test_confirm_from_another_session_is_rejected(parties):
    client, server, enrollment = parties
    first = ClientHandshake(client, server.public)
    _, old_confirm = first.finish(ServerHandshake(server, enrollment).respond(first.hello()))
    second_client = ClientHandshake(client, server.public)
    second_server = ServerHandshake(server, enrollment)
    second_server.respond(second_client.hello())
    with pytest.raises(HandshakeError, match="signature"):
        second_server.finish(old_confirm)


def test_context_mismatch(parties):
    client, server, enrollment = parties
    client_hs = ClientHandshake(client, server.public, context=b"job-1")
    response = ServerHandshake(server, enrollment, context=b"job-2").respond(client_hs.hello())
    with pytest.raises(HandshakeError, match="different contexts"):
        client_hs.finish(response)


def test_cipher_not_allowed_by_server(parties):
    client, server, enrollment = parties
    client_hs = ClientHandshake(client, server.public, cipher=Cipher.CHACHA20_POLY1305)
    server_hs = ServerHandshake(server, enrollment, ciphers=(Cipher.AES_256_GCM,))
    with pytest.raises(HandshakeError, match="chacha20-poly1305.*allows aes-256-gcm"):
        server_hs.respond(client_hs.hello())


def test_low_order_ephemeral_key(parties):
    client, server, enrollment = parties
    hello = ClientHandshake(client, server.public).hello()
    forged = hello[:39] + b"\x00" * 32 + hello[71:]
    with pytest.raises(HandshakeError, match="low-order"):
        ServerHandshake(server, enrollment).respond(forged)


def test_handshake_objects_are_single_use(parties):
    client, server, enrollment = parties
    client_hs, server_hs = (
        ClientHandshake(client, server.public),
        ServerHandshake(server, enrollment),
    )
    with pytest.raises(HandshakeError, match="hello\\(\\) first"):
        client_hs.finish(b"")
    with pytest.raises(HandshakeError, match="respond\\(\\) first"):
        server_hs.finish(b"")
    hello = client_hs.hello()
    with pytest.raises(HandshakeError, match="already called"):
        client_hs.hello()
    response = server_hs.respond(hello)
    with pytest.raises(HandshakeError, match="already called"):
        server_hs.respond(hello)
    with pytest.raises(HandshakeError):
        client_hs.finish(_flip(response, RESPONSE_SIZE - 1))
    with pytest.raises(HandshakeError):  # a failure is final: no second try with the real one
        client_hs.finish(response)


def test_cipher_names():
    assert Cipher.from_name("aes-256-gcm") is Cipher.AES_256_GCM
    assert Cipher.from_name("chacha20-poly1305") is Cipher.CHACHA20_POLY1305
    with pytest.raises(ValueError, match="allowed: aes-256-gcm, chacha20-poly1305"):
        Cipher.from_name("rc4")


def test_message_fields_are_size_checked():
    with pytest.raises(KeyMaterialError, match="client_nonce must be 32 bytes"):
        ClientHello(Cipher.AES_256_GCM, b"\x00" * 32, b"\x00" * 32, b"\x00" * 31)
