"""Secure-aggregation wire format: stage names, round config, message framing, pairwise seeds.

Every SecAgg message is ``magic "STSA" | version u8 | kind u8 | round u64 | sender u64 | body``;
:func:`unpack_message` checks magic, version, kind and round before the body is read. The
protocol itself (client and server) is :mod:`silotune.crypto.masking`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from silotune.crypto.exceptions import CryptoError, KeyMaterialError
from silotune.crypto.fixedpoint import FixedPointCodec
from silotune.crypto.x25519 import check_public_key

STAGE_SETUP = "setup"
STAGE_SHARE_KEYS = "share_keys"
STAGE_COLLECT_MASKED_VECTORS = "collect_masked_vectors"
STAGE_UNMASK = "unmask"
STAGES = (STAGE_SETUP, STAGE_SHARE_KEYS, STAGE_COLLECT_MASKED_VECTORS, STAGE_UNMASK)

VERSION = 1
MAX_SILOS = 255
MAX_VECTOR_LENGTH = 1 << 31
MAGIC = b"STSA"
HEADER = struct.Struct(">4sBBQQ")  # magic, version, kind, round_id, sender
KIND_PUBKEY, KIND_KEYS, KIND_BUNDLE, KIND_MASKED, KIND_UNMASK, KIND_REVEAL = range(1, 7)
PAIR_SALT = b"silotune/secagg/v1/pair"


@dataclass(frozen=True)
class SecAggConfig:
    """Parameters of one secure-aggregation round, sent by the server in ``STAGE_SETUP``.

    Parameters
    ----------
    round_id : int
        Round number, 0 <= round_id < 2**64; bound into every message and PRG stream.
    silo_ids : tuple of int
        Distinct silo ids, 0 <= id < 2**63, 2 to 255 of them (stored sorted).
    threshold : int
        Shares needed for recovery, ``len(silo_ids) // 2 + 1 <= threshold <= len(silo_ids)``.
    vector_length : int
        Number of values in each update, 1 <= vector_length <= 2**31.
    clip : float
        Each (pre-weighted) value is clipped to ``[-clip, clip]``.
    """

    round_id: int
    silo_ids: tuple[int, ...]
    threshold: int
    vector_length: int
    clip: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.round_id, int) or not 0 <= self.round_id < 1 << 64:
            raise ValueError(f"round_id must be an int in [0, 2**64), got {self.round_id!r}.")
        ids = tuple(self.silo_ids)
        if not all(isinstance(i, int) and 0 <= i < 1 << 63 for i in ids):
            raise ValueError("silo_ids must be ints in [0, 2**63).")
        if len(set(ids)) != len(ids) or not 2 <= len(ids) <= MAX_SILOS:
            raise ValueError(f"silo_ids must be 2 to {MAX_SILOS} distinct ids, got {len(ids)}.")
        object.__setattr__(self, "silo_ids", tuple(sorted(ids)))
        n = len(ids)
        if not isinstance(self.threshold, int) or not n // 2 + 1 <= self.threshold <= n:
            raise ValueError(
                f"threshold must be an int in [{n // 2 + 1}, {n}] for {n} silos, "
                f"got {self.threshold!r}."
            )
        if not isinstance(self.vector_length, int) or not (
            1 <= self.vector_length <= MAX_VECTOR_LENGTH
        ):
            raise ValueError(
                f"vector_length must be an int in [1, {MAX_VECTOR_LENGTH}], "
                f"got {self.vector_length!r}."
            )
        if (
            not isinstance(self.clip, (int, float))
            or not math.isfinite(self.clip)
            or self.clip <= 0
        ):
            raise ValueError(f"clip must be a finite number > 0, got {self.clip!r}.")

    @property
    def codec(self) -> FixedPointCodec:
        """The uint32 codec whose sum over all silos cannot wrap."""
        return FixedPointCodec(clip=float(self.clip), n_silos=len(self.silo_ids), bits=32)

    def share_x(self, silo_id: int) -> int:
        """Shamir x coordinate held by ``silo_id`` (its 1-based position in ``silo_ids``)."""
        return self.silo_ids.index(silo_id) + 1

    def to_bytes(self) -> bytes:
        """Serialize as versioned JSON."""
        doc = {
            "version": VERSION,
            "round_id": self.round_id,
            "silo_ids": list(self.silo_ids),
            "threshold": self.threshold,
            "vector_length": self.vector_length,
            "clip": float(self.clip),
        }
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SecAggConfig:
        """Parse and validate a config message."""
        try:
            doc = json.loads(bytes(data).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError("SecAgg config is not valid UTF-8 JSON.") from exc
        keys = {"version", "round_id", "silo_ids", "threshold", "vector_length", "clip"}
        if not isinstance(doc, dict) or set(doc) != keys:
            raise ValueError(f"SecAgg config must be a JSON object with keys {sorted(keys)}.")
        if doc["version"] != VERSION:
            raise ValueError(f"SecAgg config version must be {VERSION}, got {doc['version']!r}.")
        if not isinstance(doc["silo_ids"], list):
            raise ValueError("SecAgg config silo_ids must be a list of ints.")
        return cls(
            round_id=doc["round_id"],
            silo_ids=tuple(doc["silo_ids"]),
            threshold=doc["threshold"],
            vector_length=doc["vector_length"],
            clip=doc["clip"],
        )


def pair_seed(
    private_key: X25519PrivateKey, peer_public: bytes, round_id: int, a: int, b: int
) -> bytes:
    """Derive the 32-byte pairwise mask seed of silos ``a`` and ``b`` for one round.

    Both silos get the same seed: X25519 is symmetric and the HKDF info orders the ids.
    """
    peer_public = check_public_key(peer_public, "peer mask key")
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise KeyMaterialError(f"X25519 exchange with silo key failed: {exc}") from exc
    lo, hi = sorted((a, b))
    info = struct.pack(">QQQ", round_id, lo, hi)
    return HKDF(hashes.SHA256(), 32, PAIR_SALT, info).derive(shared)


def pack_message(kind: int, round_id: int, sender: int, body: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, round_id, sender) + body


def unpack_message(data: bytes, kind: int, round_id: int, what: str) -> tuple[int, memoryview]:
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"{what} must be bytes, got {type(data).__name__}.")
    if len(data) < HEADER.size:
        raise CryptoError(f"{what} is truncated: {len(data)} bytes, header needs {HEADER.size}.")
    magic, version, got_kind, got_round, sender = HEADER.unpack_from(data, 0)
    if magic != MAGIC or version != VERSION:
        raise CryptoError(f"{what} has a bad magic or version (expected {MAGIC!r} v{VERSION}).")
    if got_kind != kind:
        raise CryptoError(f"{what} has message kind {got_kind}, expected {kind}.")
    if got_round != round_id:
        raise CryptoError(f"{what} is for round {got_round}, expected round {round_id}.")
    return sender, memoryview(data)[HEADER.size :]


def pack_ids(ids: list[int]) -> bytes:
    return struct.pack(f">H{len(ids)}Q", len(ids), *ids)


def unpack_ids(body: memoryview, off: int, what: str) -> tuple[list[int], int]:
    if len(body) < off + 2:
        raise CryptoError(f"{what} is truncated.")
    (count,) = struct.unpack_from(">H", body, off)
    end = off + 2 + 8 * count
    if len(body) < end:
        raise CryptoError(f"{what} is truncated.")
    return list(struct.unpack_from(f">{count}Q", body, off + 2)), end


def parse_key_broadcast(data: bytes, config: SecAggConfig) -> dict[int, bytes]:
    _, body = unpack_message(data, KIND_KEYS, config.round_id, "Key broadcast")
    (count,) = struct.unpack_from(">H", body, 0) if len(body) >= 2 else (-1,)
    if count < 0 or len(body) != 2 + 40 * count:
        raise CryptoError("Key broadcast is truncated or has trailing bytes.")
    keys: dict[int, bytes] = {}
    for k in range(count):
        (sid,) = struct.unpack_from(">Q", body, 2 + 40 * k)
        if sid not in config.silo_ids or sid in keys:
            raise CryptoError(f"Key broadcast names unknown or duplicate silo {sid}.")
        keys[sid] = check_public_key(body[10 + 40 * k : 42 + 40 * k], f"mask key of silo {sid}")
    if len(keys) < config.threshold:
        raise CryptoError(
            f"Key broadcast has {len(keys)} keys; the threshold is {config.threshold}."
        )
    return keys


def parse_unmask_request(data: bytes, config: SecAggConfig) -> tuple[list[int], list[int]]:
    _, body = unpack_message(data, KIND_UNMASK, config.round_id, "Unmask request")
    survivors, off = unpack_ids(body, 0, "Unmask request")
    dropped, off = unpack_ids(body, off, "Unmask request")
    if off != len(body):
        raise CryptoError("Unmask request has trailing bytes.")
    for group in (survivors, dropped):
        if len(set(group)) != len(group):
            raise CryptoError("Unmask request lists a silo twice.")
    return survivors, dropped
