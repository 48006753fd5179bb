"""Sealed storage: AES-256-GCM under a key only the same measurement on the same platform derives.

``key = HKDF-SHA256(platform_secret, info = b"silotune/seal/v1" || measurement)``; the measurement
and the caller's label are associated data, so a blob sealed by one enclave does not open in an
enclave with another measurement, on another platform, or under another label. Blob layout::

    b"SSL1" (4) | nonce (12) | AES-GCM ciphertext and tag
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from silotune.enclave.base import MEASUREMENT_SIZE
from silotune.errors import SealingError

__all__ = ["SealingError", "seal", "sealing_key", "unseal"]

SEAL_INFO = b"silotune/seal/v1"
SEAL_MAGIC = b"SSL1"
NONCE_SIZE = 12
TAG_SIZE = 16
MAX_LABEL_CHARS = 128


def sealing_key(platform_secret: bytes, measurement: bytes) -> bytes:
    """The 32-byte AES key of the enclave with ``measurement`` on the platform with that secret."""
    if not isinstance(platform_secret, bytes) or len(platform_secret) < 32:
        raise ValueError("platform_secret must be at least 32 bytes")
    if not isinstance(measurement, bytes) or len(measurement) != MEASUREMENT_SIZE:
        raise ValueError(f"measurement must be {MEASUREMENT_SIZE} bytes")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=SEAL_INFO + measurement)
    return hkdf.derive(platform_secret)


def _associated(measurement: bytes, label: str) -> bytes:
    if not isinstance(label, str) or not 0 < len(label) <= MAX_LABEL_CHARS:
        raise ValueError(f"a sealing label is a str of 1..{MAX_LABEL_CHARS} characters")
    return SEAL_INFO + measurement + label.encode("utf-8")


def seal(platform_secret: bytes, measurement: bytes, data: bytes, label: str) -> bytes:
    """Encrypt ``data`` so that only this measurement on this platform opens it under ``label``."""
    if not isinstance(data, bytes):
        raise TypeError(f"sealed data must be bytes, got {type(data).__name__}")
    key = sealing_key(platform_secret, measurement)
    nonce = os.urandom(NONCE_SIZE)
    sealed = AESGCM(key).encrypt(nonce, data, _associated(measurement, label))
    return SEAL_MAGIC + nonce + sealed


def unseal(platform_secret: bytes, measurement: bytes, blob: bytes, label: str) -> bytes:
    """Open a blob from :func:`seal`.

    Raises
    ------
    SealingError
        If the blob is malformed, tampered, or was sealed by another measurement, platform or
        label.
    """
    if not isinstance(blob, bytes) or len(blob) < len(SEAL_MAGIC) + NONCE_SIZE + TAG_SIZE:
        raise SealingError("sealed blob is truncated or not bytes")
    if not blob.startswith(SEAL_MAGIC):
        raise SealingError(f"not a sealed blob: it does not start with {SEAL_MAGIC!r}")
    key = sealing_key(platform_secret, measurement)
    nonce = blob[len(SEAL_MAGIC) : len(SEAL_MAGIC) + NONCE_SIZE]
    try:
        return AESGCM(key).decrypt(
            nonce, blob[len(SEAL_MAGIC) + NONCE_SIZE :], _associated(measurement, label)
        )
    except InvalidTag:
        raise SealingError(
            f"sealed blob '{label}' does not open: it was sealed by another enclave measurement "
            "or platform, or it was tampered with"
        ) from None
