"""AEAD frames over a handshake's session keys: seal, open, replay and order checks, rekeying.

Frame layout (integers big-endian)::

    offset  size  field
    0       1     version (= 1)
    1       1     direction (1 = client->server, 2 = server->client)
    2       4     key epoch
    6       8     sequence number
    14      n     ciphertext (as long as the plaintext)
    14+n    16    AEAD tag

Key schedule, for each direction separately (as in TLS 1.3)::

    secret_0     = the direction's traffic secret from the handshake
    key_e        = HKDF-Expand-SHA256(secret_e, "silotune/frame/v1 key", 32)
    iv_e         = HKDF-Expand-SHA256(secret_e, "silotune/frame/v1 iv", 12)
    secret_e+1   = HKDF-Expand-SHA256(secret_e, "silotune/frame/v1 next epoch", 32)
    nonce        = iv_e XOR (4 zero bytes | sequence u64)
    associated   = "silotune/frame/v1" | session id (32) | header (14)

Security invariants
-------------------
- Nonce uniqueness: a key is used by one direction in one epoch only (the two directions and all
  epochs have independent secrets); within it the nonce is ``iv XOR sequence``, injective in the
  sequence number; the sequence number of a direction starts at 0, grows by one per sealed frame,
  never resets (not even at a rekey) and never wraps: sealing past 2**64 - 1 raises. The session
  keys refuse to back a second channel of the same role, which would restart at 0.
- The associated data binds the protocol version, the session id, the direction, the sequence
  number and the epoch (the whole header is authenticated), so a frame cannot be moved to another
  session, reflected to its sender, replayed, reordered or relabelled without failing.
- A rejected frame changes nothing: ``open`` computes on local copies (a candidate next-epoch key,
  the decrypted plaintext) and commits the sequence number and epoch only after the tag verified
  *and* the sequence number is exactly the next one. The next legitimate frame therefore still
  opens: the session survives garbage, replays and tampering on the wire.
- Errors are precise: every frame that fails authentication raises AuthenticationError; a frame
  that authenticates but was already accepted raises ReplayError; one that authenticates but
  skips ahead raises OrderError. (Frames of retired or far-future epochs cannot be authenticated
  any more; they are classified by their sequence number.) The channel expects a reliable ordered
  transport (a gRPC stream); a gap is an error, never silently skipped.
- Rekeying: the sender moves to the next epoch right after a frame that brings the epoch's total
  to ``rekey_bytes`` plaintext bytes or ``rekey_frames`` frames, and drops the old key; the
  receiver derives the same next key when it first sees the new epoch number, one epoch at a
  time, and drops its old key once a frame under the new key has been accepted. Each side's policy
  governs what it sends; the two sides need not share it. "Drops" is best effort in Python: the
  secrets we hold in a bytearray are zeroed and the cipher objects are released, but Python cannot
  wipe copies the interpreter made.

A channel object is not thread-safe: use one per stream, or lock around ``seal`` and ``open``.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from silotune.crypto.exceptions import (
    AuthenticationError,
    CryptoError,
    OrderError,
    ReplayError,
    TruncationError,
)
from silotune.crypto.handshake import Cipher, Role, SessionKeys

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_REKEY_BYTES",
    "DEFAULT_REKEY_FRAMES",
    "FRAME_VERSION",
    "HEADER_SIZE",
    "OVERHEAD",
    "TAG_SIZE",
    "Cipher",
    "Role",
    "SecureChannel",
    "SessionKeys",
]

log = logging.getLogger(__name__)

FRAME_VERSION = 1
LABEL = b"silotune/frame/v1"
DIRECTION_CLIENT_TO_SERVER = 1
DIRECTION_SERVER_TO_CLIENT = 2
_HEADER = struct.Struct(">BBIQ")  # version, direction, epoch, sequence
HEADER_SIZE = _HEADER.size  # 14
TAG_SIZE = 16
OVERHEAD = HEADER_SIZE + TAG_SIZE
KEY_SIZE = 32
IV_SIZE = 12
MAX_SEQUENCE = 2**64 - 1
MAX_EPOCH = 2**32 - 1
DEFAULT_REKEY_BYTES = 2**32
DEFAULT_REKEY_FRAMES = 2**32
DEFAULT_MAX_FRAME_SIZE = 16 * 2**20 + OVERHEAD  # 16 MiB of payload per frame


class _AEAD(Protocol):
    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...


# Looked up at key-derivation time, so a test can wrap a cipher to record (key, nonce) pairs.
_AEAD_FACTORIES: dict[Cipher, Callable[[bytes], _AEAD]] = {
    Cipher.AES_256_GCM: AESGCM,
    Cipher.CHACHA20_POLY1305: ChaCha20Poly1305,
}
_DIRECTION_NAMES = {
    DIRECTION_CLIENT_TO_SERVER: "client->server",
    DIRECTION_SERVER_TO_CLIENT: "server->client",
}


def _expand(secret: bytes | bytearray, label: bytes, length: int) -> bytes:
    return HKDFExpand(hashes.SHA256(), length, LABEL + b" " + label).derive(secret)


def _nonce(iv: bytes, sequence: int) -> bytes:
    """``iv XOR (4 zero bytes | sequence u64)``: one distinct nonce per sequence number."""
    return (int.from_bytes(iv, "big") ^ sequence).to_bytes(IV_SIZE, "big")


class _Epoch:
    """The key material of one direction in one epoch."""

    __slots__ = ("aead", "cipher", "iv", "number", "secret")

    def __init__(self, cipher: Cipher, secret: bytes | bytearray, number: int) -> None:
        self.cipher = cipher
        self.number = number
        self.secret = bytearray(secret)
        self.aead = _AEAD_FACTORIES[cipher](_expand(self.secret, b"key", KEY_SIZE))
        self.iv = _expand(self.secret, b"iv", IV_SIZE)

    def next(self) -> _Epoch:
        """The following epoch's key material (this one is left untouched)."""
        return _Epoch(self.cipher, _expand(self.secret, b"next epoch", KEY_SIZE), self.number + 1)

    def erase(self) -> None:
        self.secret[:] = bytes(len(self.secret))


def _as_bytes(name: str, value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{name} must be bytes, got {type(value).__name__}")


def _positive_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class SecureChannel:
    """Seal and open AEAD frames for one role of one session.

    Parameters
    ----------
    keys
        From :meth:`ClientHandshake.finish` or :meth:`ServerHandshake.finish`. Claimed for
        ``role``: a second channel of the same role on the same keys is refused.
    role
        ``"client"`` (the silo) or ``"server"`` (coordinator or enclave), or a :class:`Role`.
    rekey_bytes, rekey_frames
        Move the sending direction to a fresh key after this many plaintext bytes or frames.
    max_frame_size
        Largest frame (header + ciphertext + tag) ``open`` accepts and ``seal`` produces.
    """

    def __init__(
        self,
        keys: SessionKeys,
        role: Role | str,
        *,
        rekey_bytes: int = DEFAULT_REKEY_BYTES,
        rekey_frames: int = DEFAULT_REKEY_FRAMES,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        if not isinstance(keys, SessionKeys):
            raise TypeError(f"keys must be SessionKeys, got {type(keys).__name__}")
        if isinstance(role, str):
            allowed = {r.value: r for r in Role}
            if role not in allowed:
                raise ValueError(f"role must be one of {sorted(allowed)}, got {role!r}")
            role = allowed[role]
        if not isinstance(role, Role):
            raise TypeError(f"role must be a Role or str, got {type(role).__name__}")
        self._rekey_bytes = _positive_int("rekey_bytes", rekey_bytes, 1)
        self._rekey_frames = _positive_int("rekey_frames", rekey_frames, 1)
        self._max_frame_size = _positive_int("max_frame_size", max_frame_size, OVERHEAD)
        send_secret, receive_secret = keys._claim(role)  # last: a bad argument burns no claim
        self._role = role
        self._cipher = keys.cipher
        self._session_id = keys.session_id
        self._ad_prefix = LABEL + keys.session_id
        if role is Role.CLIENT:
            self._send_dir, self._recv_dir = DIRECTION_CLIENT_TO_SERVER, DIRECTION_SERVER_TO_CLIENT
        else:
            self._send_dir, self._recv_dir = DIRECTION_SERVER_TO_CLIENT, DIRECTION_CLIENT_TO_SERVER
        self._send = _Epoch(keys.cipher, send_secret, 0)
        self._recv = _Epoch(keys.cipher, receive_secret, 0)
        self._send_seq = 0  # sequence number of the next frame sealed
        self._recv_seq = 0  # sequence number of the only frame open() accepts next
        self._epoch_bytes = 0  # plaintext bytes sealed under the current sending key
        self._epoch_frames = 0  # frames sealed under the current sending key

    @property
    def role(self) -> Role:
        return self._role

    @property
    def cipher(self) -> Cipher:
        return self._cipher

    @property
    def session_id(self) -> bytes:
        return self._session_id

    @property
    def max_frame_size(self) -> int:
        return self._max_frame_size

    @property
    def send_sequence(self) -> int:
        """Sequence number the next sealed frame will carry."""
        return self._send_seq

    @property
    def receive_sequence(self) -> int:
        """Sequence number the next accepted frame must carry."""
        return self._recv_seq

    @property
    def send_epoch(self) -> int:
        return self._send.number

    @property
    def receive_epoch(self) -> int:
        return self._recv.number

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext`` into the next frame of this side's direction."""
        data = _as_bytes("plaintext", plaintext)
        if len(data) > self._max_frame_size - OVERHEAD:
            raise ValueError(
                f"plaintext of {len(data)} bytes does not fit in max_frame_size "
                f"{self._max_frame_size} (at most {self._max_frame_size - OVERHEAD} bytes)"
            )
        if self._send_seq > MAX_SEQUENCE:
            raise CryptoError("sequence numbers of this channel are exhausted; run a new handshake")
        if self._epoch_frames >= self._rekey_frames or self._epoch_bytes >= self._rekey_bytes:
            # only reachable when the last epoch was reached and could not be advanced
            raise CryptoError("key epochs of this channel are exhausted; run a new handshake")
        header = _HEADER.pack(FRAME_VERSION, self._send_dir, self._send.number, self._send_seq)
        body = self._send.aead.encrypt(
            _nonce(self._send.iv, self._send_seq), data, self._ad_prefix + header
        )
        self._send_seq += 1
        self._epoch_bytes += len(data)
        self._epoch_frames += 1
        if (
            self._epoch_frames >= self._rekey_frames or self._epoch_bytes >= self._rekey_bytes
        ) and self._send.number < MAX_EPOCH:
            old, self._send = self._send, self._send.next()
            old.erase()
            self._epoch_bytes = self._epoch_frames = 0
            log.debug(
                "session %s: %s key moved to epoch %d at sequence %d",
                self._session_id.hex()[:16],
                _DIRECTION_NAMES[self._send_dir],
                self._send.number,
                self._send_seq,
            )
        return header + body

    def open(self, frame: bytes) -> bytes:
        """Check and decrypt the next frame from the peer; a rejected frame changes no state."""
        data = _as_bytes("frame", frame)
        if len(data) > self._max_frame_size:
            raise CryptoError(
                f"frame of {len(data)} bytes exceeds max_frame_size {self._max_frame_size}"
            )
        if len(data) < OVERHEAD:
            raise TruncationError(
                f"frame of {len(data)} bytes is shorter than header + tag ({OVERHEAD} bytes)"
            )
        version, direction, epoch, seq = _HEADER.unpack_from(data)
        if version != FRAME_VERSION:
            raise AuthenticationError(
                f"frame version {version} is not supported (expected {FRAME_VERSION})"
            )
        if direction != self._recv_dir:
            if direction == self._send_dir:
                raise AuthenticationError(
                    f"frame direction is {_DIRECTION_NAMES[direction]}, this side's own sending "
                    "direction: a reflected frame"
                )
            raise AuthenticationError(f"frame direction {direction} is not 1 or 2")

        current = self._recv
        if epoch == current.number:
            candidate = current
        elif epoch == current.number + 1:
            candidate = current.next()  # tentative: kept only if this frame is accepted
        elif epoch < current.number:
            if seq < self._recv_seq:
                raise ReplayError(
                    f"frame {seq} of retired epoch {epoch} was already accepted (next: "
                    f"{self._recv_seq}, epoch {current.number})"
                )
            raise AuthenticationError(f"frame {seq} claims retired epoch {epoch}: tampered")
        else:
            if seq > self._recv_seq:
                raise OrderError(
                    f"frame {seq} of epoch {epoch} arrived while frame {self._recv_seq} of epoch "
                    f"{current.number} is expected: frames were skipped"
                )
            raise AuthenticationError(f"frame {seq} claims future epoch {epoch}: tampered")

        header = data[:HEADER_SIZE]
        try:
            plaintext = candidate.aead.decrypt(
                _nonce(candidate.iv, seq), data[HEADER_SIZE:], self._ad_prefix + header
            )
        except InvalidTag:
            if candidate is not current:
                candidate.erase()
            raise AuthenticationError(
                f"frame {seq} (epoch {epoch}) failed authentication: tampered, truncated, or "
                "not from this session"
            ) from None
        if seq != self._recv_seq:
            if candidate is not current:
                candidate.erase()
            if seq < self._recv_seq:
                raise ReplayError(f"frame {seq} was already accepted (next: {self._recv_seq})")
            raise OrderError(
                f"frame {seq} arrived while frame {self._recv_seq} is expected: out of order or "
                "frames were skipped"
            )
        # commit: the only place receive state changes
        if candidate is not current:
            current.erase()
            self._recv = candidate
            log.debug(
                "session %s: %s key moved to epoch %d at sequence %d",
                self._session_id.hex()[:16],
                _DIRECTION_NAMES[self._recv_dir],
                candidate.number,
                seq,
            )
        self._recv_seq += 1
        return plaintext

    def __repr__(self) -> str:
        return (
            f"SecureChannel(role={self._role.value}, cipher={self._cipher.label}, "
            f"session={self._session_id.hex()[:16]}..., send={self._send_seq}@{self._send.number}"
            f", receive={self._recv_seq}@{self._recv.number})"
        )
