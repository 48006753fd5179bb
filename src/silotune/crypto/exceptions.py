"""Exceptions raised by silotune.crypto (defined in silotune.errors); a failed check raises."""

from silotune.errors import (
    AuthenticationError,
    CryptoError,
    HandshakeError,
    KeyMaterialError,
    OrderError,
    ReplayError,
    TruncationError,
    UnknownIdentityError,
)

__all__ = [
    "AuthenticationError",
    "CryptoError",
    "HandshakeError",
    "KeyMaterialError",
    "OrderError",
    "ReplayError",
    "TruncationError",
    "UnknownIdentityError",
]
