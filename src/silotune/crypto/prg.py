"""Cryptographic PRG: expand a 32-byte seed into uint32 masks with HKDF + AES-256-CTR."""

from __future__ import annotations

import struct

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from silotune.crypto.exceptions import KeyMaterialError

__all__ = ["SEED_BYTES", "MAX_WORDS", "derive_key", "expand", "expand_bytes"]

SEED_BYTES = 32
# AES-CTR with a zero IV and a 128-bit counter: one derived key may produce 2**64 blocks safely;
# we cap a single call far below that so a mistaken length fails loudly instead of allocating.
MAX_WORDS = 1 << 32
_PRG_SALT = b"silotune/prg/v1"
_ZERO_IV = bytes(16)


def _check_seed(seed: bytes) -> None:
    if not isinstance(seed, (bytes, bytearray)):
        raise TypeError(f"seed must be bytes, got {type(seed).__name__}.")
    if len(seed) != SEED_BYTES:
        raise KeyMaterialError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}.")


def derive_key(seed: bytes, *, label: bytes, round_id: int = 0, index: int = 0) -> bytes:
    """Derive the AES-256 key for one (label, round, index) stream from a seed.

    Parameters
    ----------
    seed : bytes
        32 bytes of secret key material (a pairwise or self-mask seed).
    label : bytes
        Domain-separation label (for example ``b"pair"`` or ``b"self"``), 1 to 64 bytes.
    round_id : int
        Federated round, 0 <= round_id < 2**64.
    index : int
        Tensor or chunk index inside the round, 0 <= index < 2**64.

    Returns
    -------
    bytes
        32-byte AES key, distinct for every (seed, label, round_id, index).
    """
    _check_seed(seed)
    if not isinstance(label, (bytes, bytearray)) or not 1 <= len(label) <= 64:
        raise ValueError("label must be 1 to 64 bytes.")
    for name, value in (("round_id", round_id), ("index", index)):
        if not isinstance(value, int) or not 0 <= value < 1 << 64:
            raise ValueError(f"{name} must be an int in [0, 2**64), got {value!r}.")
    # The info field is length-prefixed so that no two (label, round, index) triples collide.
    info = struct.pack(">B", len(label)) + bytes(label) + struct.pack(">QQ", round_id, index)
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_PRG_SALT, info=info)
    return hkdf.derive(bytes(seed))


def expand_bytes(
    seed: bytes, n_bytes: int, *, label: bytes, round_id: int = 0, index: int = 0
) -> bytes:
    """Return ``n_bytes`` of AES-256-CTR keystream for the derived (label, round, index) key.

    Parameters
    ----------
    seed, label, round_id, index
        As in :func:`derive_key`.
    n_bytes : int
        Number of pseudorandom bytes, 0 <= n_bytes <= 4 * MAX_WORDS.

    Returns
    -------
    bytes
        The keystream (AES-256-CTR of zeros, zero IV, big-endian 128-bit counter).
    """
    if not isinstance(n_bytes, int) or not 0 <= n_bytes <= 4 * MAX_WORDS:
        raise ValueError(f"n_bytes must be an int in [0, {4 * MAX_WORDS}], got {n_bytes!r}.")
    key = derive_key(seed, label=label, round_id=round_id, index=index)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor()
    # One call over a zero buffer: the C backend streams it at AES-NI speed.
    return encryptor.update(bytes(n_bytes)) + encryptor.finalize()


def expand(
    seed: bytes, n: int, *, label: bytes, round_id: int = 0, index: int = 0
) -> NDArray[np.uint32]:
    """Expand a seed into ``n`` uniformly distributed uint32 values.

    Parameters
    ----------
    seed : bytes
        32-byte seed.
    n : int
        Number of uint32 words, 0 <= n <= MAX_WORDS.
    label, round_id, index
        Domain separation, as in :func:`derive_key`.

    Returns
    -------
    numpy.ndarray
        Shape ``(n,)``, dtype uint32, read-only; the keystream read as little-endian words.
    """
    if not isinstance(n, int) or not 0 <= n <= MAX_WORDS:
        raise ValueError(f"n must be an int in [0, {MAX_WORDS}], got {n!r}.")
    stream = expand_bytes(seed, 4 * n, label=label, round_id=round_id, index=index)
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)
