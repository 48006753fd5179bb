"""Tests for AEAD frames: known answers, every rejection, session survival, rekeying, nonces."""

import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from silotune.crypto import channel
from silotune.crypto.channel import HEADER_SIZE, OVERHEAD, Cipher, SecureChannel, SessionKeys
from silotune.crypto.exceptions import (
    AuthenticationError,
    CryptoError,
    OrderError,
    ReplayError,
    TruncationError,
)

SESSION_ID, C2S, S2C = b"\x44" * 32, b"\x55" * 32, b"\x66" * 32


def _keys(cipher=Cipher.AES_256_GCM, session_id=SESSION_ID):
    return SessionKeys(
        session_id=session_id, client_to_server=C2S, server_to_client=S2C, cipher=cipher
    )


def _pair(cipher=Cipher.AES_256_GCM, **client_options):
    """A connected (client, server) pair, as after a handshake (each side has its own keys)."""
    return SecureChannel(_keys(cipher), "client", **client_options), SecureChannel(
        _keys(cipher), "server"
    )


def _flip(frame: bytes, index: int, bit: int = 0) -> bytes:
    return frame[:index] + bytes([frame[index] ^ (1 << bit)]) + frame[index + 1 :]


def _hkdf_expand(secret: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-Expand written out with hmac, independent of the code under test."""
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(secret, block + info + bytes([counter]), hashlib.sha256).digest()
        out, counter = out + block, counter + 1
    return out[:length]


# --- known answers ------------------------------------------------------------------------------

KAT = {
    "aes_client_epoch0": (
        "01010000000000000000000000003caadb2b22c4ca1173be5264b30670c51018cf5d8dcaffbd"
    ),
    "aes_client_epoch1": (
        "0101000000010000000000000001d06f3e5ce8c0e955dfcbfdb5f744643e72a72fe884d093cf"
    ),
    "aes_server_epoch0": (
        "0102000000000000000000000000f0d51ef7119cc4c57baa8163b71256f81d7dc41b7b3fb95e"
    ),
    "chacha_client_epoch0": (
        "0101000000000000000000000000e67295a25d7de202824c2f2a2eeb763c89a81216b485993f"
    ),
}


def test_sealed_frames_known_answer():
    client = SecureChannel(_keys(), "client", rekey_frames=1)
    assert client.seal(b"silotune").hex() == KAT["aes_client_epoch0"]
    assert client.seal(b"silotune").hex() == KAT["aes_client_epoch1"]  # after one rekey
    assert SecureChannel(_keys(), "server").seal(b"silotune").hex() == KAT["aes_server_epoch0"]
    chacha = SecureChannel(_keys(Cipher.CHACHA20_POLY1305), "client")
    assert chacha.seal(b"silotune").hex() == KAT["chacha_client_epoch0"]


def test_known_answer_matches_the_documented_format():
    """Rebuild the KAT frames from the module docstring's recipe, with AESGCM and hmac only."""
    label = b"silotune/frame/v1"
    secret = C2S
    for epoch, expected in enumerate([KAT["aes_client_epoch0"], KAT["aes_client_epoch1"]]):
        key = _hkdf_expand(secret, label + b" key", 32)
        iv = _hkdf_expand(secret, label + b" iv", 12)
        sequence = epoch  # rekey_frames=1: one frame per epoch
        header = struct.pack(">BBIQ", 1, 1, epoch, sequence)
        nonce = bytes(
            a ^ b for a, b in zip(iv, b"\x00" * 4 + sequence.to_bytes(8, "big"), strict=True)
        )
        frame = header + AESGCM(key).encrypt(nonce, b"silotune", label + SESSION_ID + header)
        assert frame.hex() == expected
        secret = _hkdf_expand(secret, label + b" next epoch", 32)


def test_header_layout():
    client, _ = _pair()
    client.seal(b"first")
    frame = client.seal(b"payload")
    assert len(frame) == HEADER_SIZE + len(b"payload") + 16 == len(b"payload") + OVERHEAD
    version, direction, epoch, sequence = struct.unpack(">BBIQ", frame[:HEADER_SIZE])
    assert (version, direction, epoch, sequence) == (1, 1, 0, 1)


# --- round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cipher", list(Cipher))
def test_round_trip_both_directions(cipher):
    client, server = _pair(cipher)
    for i in range(5):
        assert server.open(client.seal(b"up %d" % i)) == b"up %d" % i
        assert client.open(server.seal(b"down %d" % i)) == b"down %d" % i
    assert server.open(client.seal(b"")) == b""
    assert server.open(bytearray(client.seal(bytearray(b"ba")))) == b"ba"
    assert server.open(memoryview(client.seal(memoryview(b"mv")))) == b"mv"
    assert (client.send_sequence, server.receive_sequence) == (8, 8)
    assert client.cipher is cipher and client.session_id == SESSION_ID


def test_ciphertext_does_not_contain_the_plaintext():
    client, _ = _pair()
    plaintext = b"patient record " * 8
    assert plaintext[:16] not in client.seal(plaintext)


# --- rejections, and the session survives each --------------------------------------------------


def _assert_survives(sender, receiver):
    """The next legitimate frame still opens after a rejection."""
    assert receiver.open(sender.seal(b"next")) == b"next"


@pytest.mark.parametrize("index", range(HEADER_SIZE))
@pytest.mark.parametrize("bit", [0, 7])
def test_flipped_header_bit(index, bit):
    client, server = _pair()
    frame = client.seal(b"activations")
    with pytest.raises(AuthenticationError):
        server.open(_flip(frame, index, bit))
    assert server.open(frame) == b"activations"  # the genuine frame still opens
    _assert_survives(client, server)


@pytest.mark.parametrize("where", ["ciphertext-first", "ciphertext-last", "tag-first", "tag-last"])
def test_flipped_body_bit(where):
    client, server = _pair()
    frame = client.seal(b"activations")
    index = {
        "ciphertext-first": HEADER_SIZE,
        "ciphertext-last": len(frame) - 17,
        "tag-first": len(frame) - 16,
        "tag-last": len(frame) - 1,
    }[where]
    with pytest.raises(AuthenticationError, match="failed authentication"):
        server.open(_flip(frame, index))
    assert server.open(frame) == b"activations"
    _assert_survives(client, server)


def test_replay():
    client, server = _pair()
    frame = client.seal(b"once")
    assert server.open(frame) == b"once"
    with pytest.raises(ReplayError, match="already accepted"):
        server.open(frame)
    _assert_survives(client, server)


def test_reorder_and_skip():
    client, server = _pair()
    first, second, third = (client.seal(b"%d" % i) for i in range(3))
    with pytest.raises(OrderError, match="frame 1 arrived while frame 0"):
        server.open(second)
    with pytest.raises(OrderError):
        server.open(third)
    assert [server.open(f) for f in (first, second, third)] == [b"0", b"1", b"2"]
    _assert_survives(client, server)


@pytest.mark.parametrize("length", [0, 1, HEADER_SIZE, OVERHEAD - 1])
def test_truncated_below_header_and_tag(length):
    client, server = _pair()
    frame = client.seal(b"activations")
    with pytest.raises(TruncationError, match=f"{length} bytes"):
        server.open(frame[:length])
    assert server.open(frame) == b"activations"


def test_truncated_body_fails_authentication():
    client, server = _pair()
    frame = client.seal(b"activations")
    with pytest.raises(AuthenticationError):
        server.open(frame[:-1])
    with pytest.raises(AuthenticationError):
        server.open(frame + b"\x00")
    assert server.open(frame) == b"activations"


def test_reflected_frame():
    client, server = _pair()
    frame = client.seal(b"to the server")
    with pytest.raises(AuthenticationError, match="reflected"):
        client.open(frame)
    # even with the direction byte rewritten, the key of the other direction fails it
    with pytest.raises(AuthenticationError, match="failed authentication"):
        client.open(frame[:1] + b"\x02" + frame[2:])
    assert server.open(frame) == b"to the server"
    _assert_survives(server, client)


def test_frame_from_another_session():
    client, _ = _pair()
    other_server = SecureChannel(
        SessionKeys(
            session_id=b"\x45" * 32, client_to_server=C2S, server_to_client=S2C
        ),  # same keys, other session id: the associated data differs
        "server",
    )
    with pytest.raises(AuthenticationError):
        other_server.open(client.seal(b"hello"))


def test_max_frame_size():
    client, server = _pair(max_frame_size=OVERHEAD + 100)
    assert len(client.seal(b"x" * 100)) == OVERHEAD + 100
    with pytest.raises(ValueError, match="max_frame_size"):
        client.seal(b"x" * 101)
    small_server = SecureChannel(_keys(), "server", max_frame_size=OVERHEAD + 10)
    with pytest.raises(CryptoError, match="exceeds max_frame_size"):
        small_server.open(b"\x00" * (OVERHEAD + 11))
    assert small_server.receive_sequence == 0


def test_rejections_leave_the_state_untouched():
    client, server = _pair()
    frames = [client.seal(b"%d" % i) for i in range(3)]
    server.open(frames[0])
    before = (server.receive_sequence, server.receive_epoch, server.send_sequence)
    attacks = [frames[0], frames[2], frames[1][:-1], _flip(frames[1], 3), b"", frames[1][:20]]
    for attack in attacks:
        with pytest.raises(CryptoError):
            server.open(attack)
        assert (server.receive_sequence, server.receive_epoch, server.send_sequence) == before
    assert server.open(frames[1]) == b"1"


# --- rekeying ------------------------------------------------------------------------------------


def test_rekey_at_the_frame_boundary_both_sides_keep_talking():
    client = SecureChannel(_keys(), "client", rekey_frames=3)
    server = SecureChannel(_keys(), "server", rekey_frames=2)
    epochs = []
    for i in range(10):
        frame = client.seal(b"up %d" % i)
        epochs.append(struct.unpack(">I", frame[2:6])[0])
        assert server.open(frame) == b"up %d" % i
        assert client.open(server.seal(b"down %d" % i)) == b"down %d" % i
    assert epochs == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert (client.send_epoch, server.receive_epoch) == (3, 3)
    assert (server.send_epoch, client.receive_epoch) == (5, 4)  # 10 frames / 2: moved after #10


def test_rekey_at_the_byte_boundary():
    client, server = _pair(rekey_bytes=100)
    epochs = []
    for _ in range(7):
        frame = client.seal(b"x" * 40)
        epochs.append(struct.unpack(">I", frame[2:6])[0])
        server.open(frame)
    assert epochs == [0, 0, 0, 1, 1, 1, 2]  # 120 bytes >= 100 after the third frame


def test_rekey_erases_the_old_key_from_the_object():
    client, server = _pair(rekey_frames=1)
    old_send, old_receive = client._send, server._recv
    secret_before = bytes(old_send.secret)
    server.open(client.seal(b"epoch 0"))
    assert client._send is not old_send and server._recv is old_receive  # receiver not yet
    assert bytes(old_send.secret) == bytes(32) != secret_before
    server.open(client.seal(b"epoch 1"))
    assert server._recv is not old_receive and bytes(old_receive.secret) == bytes(32)


def test_replay_from_a_retired_epoch():
    client, server = _pair(rekey_frames=2)
    frames = [client.seal(b"%d" % i) for i in range(4)]
    for frame in frames:
        server.open(frame)
    assert server.receive_epoch == 1  # frames carried epochs 0, 0, 1, 1
    with pytest.raises(ReplayError, match="retired epoch 0"):
        server.open(frames[0])
    with pytest.raises(ReplayError):
        server.open(frames[3])  # epoch 1, still current key: authenticated, then seen
    _assert_survives(client, server)


def test_tampered_first_frame_of_a_new_epoch_does_not_rekey_the_receiver():
    client, server = _pair(rekey_frames=1)
    server.open(client.seal(b"epoch 0"))
    frame = client.seal(b"epoch 1")
    with pytest.raises(AuthenticationError):
        server.open(_flip(frame, len(frame) - 1))
    assert server.receive_epoch == 0
    assert server.open(frame) == b"epoch 1"
    assert server.receive_epoch == 1


def test_skipping_into_later_epochs_is_an_order_error():
    client, server = _pair(rekey_frames=1)
    frames = [client.seal(b"%d" % i) for i in range(4)]
    with pytest.raises(OrderError):
        server.open(frames[1])  # next epoch, authenticates, but skips frame 0
    with pytest.raises(OrderError, match="skipped"):
        server.open(frames[3])  # two epochs ahead: cannot be authenticated yet
    assert server.receive_epoch == 0
    assert [server.open(f) for f in frames] == [b"0", b"1", b"2", b"3"]


# --- nonces and limits ---------------------------------------------------------------------------


def test_nonces_never_repeat_under_a_key(monkeypatch):
    """Record every (key, nonce) pair the AEAD is asked to encrypt with, across rekeys."""
    used = []

    class RecordingAESGCM:
        def __init__(self, key):
            self._key, self._aead = bytes(key), AESGCM(key)

        def encrypt(self, nonce, data, associated_data):
            used.append((self._key, bytes(nonce)))
            return self._aead.encrypt(nonce, data, associated_data)

        def decrypt(self, nonce, data, associated_data):
            return self._aead.decrypt(nonce, data, associated_data)

    monkeypatch.setitem(channel._AEAD_FACTORIES, Cipher.AES_256_GCM, RecordingAESGCM)
    client = SecureChannel(_keys(), "client", rekey_frames=500)
    server = SecureChannel(_keys(), "server", rekey_frames=700)
    for i in range(2000):
        assert server.open(client.seal(b"%d" % i)) == b"%d" % i
        assert client.open(server.seal(b"%d" % i)) == b"%d" % i
    assert len(used) == 4000
    assert len(set(used)) == 4000  # no (key, nonce) pair twice
    keys = {key for key, _ in used}
    assert len(keys) == 4 + 3  # client epochs 0-3, server epochs 0-2: every key distinct


def test_nonce_is_injective_in_the_sequence_number():
    iv = bytes(range(12))
    sequences = [0, 1, 2, 255, 256, 2**32, 2**63, 2**64 - 1]
    nonces = [channel._nonce(iv, s) for s in sequences]
    assert len(set(nonces)) == len(nonces)
    assert all(len(n) == 12 and n[:4] == iv[:4] for n in nonces)


def test_sequence_numbers_exhausted():
    client, server = _pair()
    client._send_seq = channel.MAX_SEQUENCE
    frame = client.seal(b"last")
    assert struct.unpack(">Q", frame[6:14])[0] == 2**64 - 1
    with pytest.raises(CryptoError, match="sequence numbers .* exhausted"):
        client.seal(b"one too many")
    with pytest.raises(CryptoError):
        client.seal(b"still refused")


def test_key_epochs_exhausted():
    client, _ = _pair(rekey_frames=1)
    client._send.number = channel.MAX_EPOCH
    client.seal(b"last epoch")
    with pytest.raises(CryptoError, match="key epochs .* exhausted"):
        client.seal(b"no key left")


# --- construction --------------------------------------------------------------------------------


def test_session_keys_back_one_channel_per_role():
    keys = _keys()
    SecureChannel(keys, "client")
    with pytest.raises(CryptoError, match="reuse nonces"):
        SecureChannel(keys, "client")
    SecureChannel(keys, "server")  # the other role is fine (an in-process loopback)


def test_bad_arguments():
    with pytest.raises(ValueError, match="role must be one of"):
        SecureChannel(_keys(), "coordinator")
    with pytest.raises(ValueError, match="rekey_frames"):
        SecureChannel(_keys(), "client", rekey_frames=0)
    with pytest.raises(ValueError, match="max_frame_size"):
        SecureChannel(_keys(), "client", max_frame_size=OVERHEAD - 1)
    with pytest.raises(TypeError):
        SecureChannel(_keys(), "client").seal("text")
    keys = _keys()
    with pytest.raises(ValueError):
        SecureChannel(keys, "client", rekey_bytes=-1)
    SecureChannel(keys, "client")  # a rejected construction did not use up the claim
    with pytest.raises(CryptoError, match="must be 32 bytes"):
        SessionKeys(session_id=b"\x00", client_to_server=C2S, server_to_client=S2C)


def test_repr_shows_no_secret():
    client, _ = _pair()
    assert C2S.hex()[:16] not in repr(client) and S2C.hex()[:16] not in repr(client)
    assert "role=client" in repr(client)
