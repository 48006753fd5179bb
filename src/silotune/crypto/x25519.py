"""X25519 public keys from untrusted parties: size and low-order checks before any use.

A low-order point (the all-zero key among them) makes every Diffie-Hellman result with it the
all-zero secret, so a party that announces one would make each honest peer's key agreement fail
(or, with a library that does not check, derive a key everyone knows). Every X25519 public key that
arrives from another party goes through :func:`check_public_key` where it is parsed.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from silotune.crypto.exceptions import KeyMaterialError

__all__ = ["PUBLIC_KEY_SIZE", "check_public_key"]

PUBLIC_KEY_SIZE = 32
# Any scalar works: clamping makes it a multiple of the cofactor 8, so the product with a
# low-order point is the identity, whose encoding is all zeros (which pyca refuses).
_PROBE = X25519PrivateKey.generate()


def check_public_key(raw: object, what: str = "X25519 public key") -> bytes:
    """Return ``raw`` as 32 bytes, or raise KeyMaterialError naming ``what``.

    Raises
    ------
    KeyMaterialError
        If ``raw`` is not 32 bytes or is a low-order point (all-zero and the other small-order
        encodings), whose shared secret with any key is all zeros.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise KeyMaterialError(f"{what} must be bytes, got {type(raw).__name__}")
    key = bytes(raw)
    if len(key) != PUBLIC_KEY_SIZE:
        raise KeyMaterialError(f"{what} must be {PUBLIC_KEY_SIZE} bytes, got {len(key)}")
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(key))
    except ValueError:
        raise KeyMaterialError(
            f"{what} is a low-order point (e.g. all zeros): refused, it would make every key "
            "agreement with it yield a known secret"
        ) from None
    return key
