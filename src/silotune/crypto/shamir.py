"""Shamir t-of-n secret sharing of short high-entropy secrets over the prime field GF(2**521 - 1).

A secret of 16 to 64 bytes is one field element (2**521 - 1 is a Mersenne prime, larger than any
512-bit value), so a share is one point ``(x, f(x))`` of a random polynomial ``f`` of degree
``t - 1`` with ``f(0) = secret``. Coefficients come from :mod:`secrets`.

Wire format of one share (big-endian, 89 bytes)::

    version u8 (=1) | threshold u8 | x u16 | secret_len u8 | check 16 B | y 66 B | reserved 2 B (=0)

``check`` is the first 16 bytes of SHA-256 over a domain label and the secret. It reveals nothing
useful about a uniformly random 128-bit-or-longer secret (keys and seeds, the only use here) and
lets :func:`combine` detect a tampered or mismatched share instead of returning a wrong secret.
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
import struct
from dataclasses import dataclass

from silotune.crypto.exceptions import AuthenticationError, CryptoError

__all__ = ["PRIME", "SHARE_BYTES", "VERSION", "Share", "split", "combine"]

PRIME = (1 << 521) - 1
VERSION = 1
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 64
MAX_SHARES = 255
_Y_BYTES = 66
_HEADER = struct.Struct(">BBHB")
SHARE_BYTES = _HEADER.size + 16 + _Y_BYTES + 2
_CHECK_LABEL = b"silotune/shamir/v1/check"
# When a reconstruction fails its check and more than t shares are at hand, at most this many
# other t-subsets are tried (robustness to a few bad shares without exponential work).
_MAX_SUBSETS = 256


def _check_tag(secret: bytes) -> bytes:
    return hashlib.sha256(_CHECK_LABEL + len(secret).to_bytes(1, "big") + secret).digest()[:16]


@dataclass(frozen=True)
class Share:
    """One Shamir share: the point ``(x, y)`` plus what is needed to validate and combine it."""

    threshold: int
    x: int
    secret_len: int
    check: bytes
    y: int

    def to_bytes(self) -> bytes:
        """Serialize to the fixed 89-byte wire format."""
        head = _HEADER.pack(VERSION, self.threshold, self.x, self.secret_len)
        return head + self.check + self.y.to_bytes(_Y_BYTES, "big") + b"\x00\x00"

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Parse and validate a share; malformed input raises :class:`CryptoError`."""
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"share must be bytes, got {type(data).__name__}.")
        if len(data) != SHARE_BYTES:
            raise CryptoError(f"Shamir share must be {SHARE_BYTES} bytes, got {len(data)}.")
        version, threshold, x, secret_len = _HEADER.unpack_from(data, 0)
        if version != VERSION:
            raise CryptoError(f"Shamir share version must be {VERSION}, got {version}.")
        if not 2 <= threshold <= MAX_SHARES:
            raise CryptoError(
                f"Shamir share threshold must be in [2, {MAX_SHARES}], got {threshold}."
            )
        if not 1 <= x <= MAX_SHARES:
            raise CryptoError(f"Shamir share x must be in [1, {MAX_SHARES}], got {x}.")
        if not MIN_SECRET_BYTES <= secret_len <= MAX_SECRET_BYTES:
            raise CryptoError(
                f"Shamir share secret length must be in [{MIN_SECRET_BYTES}, {MAX_SECRET_BYTES}], "
                f"got {secret_len}."
            )
        off = _HEADER.size
        check = bytes(data[off : off + 16])
        y = int.from_bytes(data[off + 16 : off + 16 + _Y_BYTES], "big")
        if y >= PRIME:
            raise CryptoError("Shamir share y must be below the field prime 2**521 - 1.")
        if data[-2:] != b"\x00\x00":
            raise CryptoError("Shamir share reserved bytes must be zero.")
        return cls(threshold=threshold, x=x, secret_len=secret_len, check=check, y=y)


def split(secret: bytes, threshold: int, n_shares: int) -> list[bytes]:
    """Split ``secret`` into ``n_shares`` shares, any ``threshold`` of which rebuild it.

    Parameters
    ----------
    secret : bytes
        16 to 64 bytes of high-entropy secret (a key or a seed).
    threshold : int
        Shares needed to reconstruct, 2 <= threshold <= n_shares.
    n_shares : int
        Number of shares, threshold <= n_shares <= 255; share ``k`` (0-based) has ``x = k + 1``.

    Returns
    -------
    list of bytes
        ``n_shares`` serialized shares.
    """
    if not isinstance(secret, (bytes, bytearray)):
        raise TypeError(f"secret must be bytes, got {type(secret).__name__}.")
    if not MIN_SECRET_BYTES <= len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(
            f"secret must be {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, got {len(secret)}."
        )
    if not isinstance(n_shares, int) or not 2 <= n_shares <= MAX_SHARES:
        raise ValueError(f"n_shares must be an int in [2, {MAX_SHARES}], got {n_shares!r}.")
    if not isinstance(threshold, int) or not 2 <= threshold <= n_shares:
        raise ValueError(f"threshold must be an int in [2, {n_shares}], got {threshold!r}.")
    secret = bytes(secret)
    coeffs = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)
    ]
    check = _check_tag(secret)
    out = []
    for x in range(1, n_shares + 1):
        y = 0
        for c in reversed(coeffs):  # Horner: f(x) = c0 + x (c1 + x (c2 + ...))
            y = (y * x + c) % PRIME
        out.append(Share(threshold, x, len(secret), check, y).to_bytes())
    return out


def _interpolate_at_zero(points: list[tuple[int, int]]) -> int:
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine(shares: list[bytes]) -> bytes:
    """Rebuild the secret from at least ``threshold`` shares.

    Parameters
    ----------
    shares : list of bytes
        Serialized shares of one secret, with distinct ``x``.

    Returns
    -------
    bytes
        The secret.

    Raises
    ------
    CryptoError
        Malformed shares, shares of different secrets, duplicate ``x`` or fewer than ``threshold``.
    AuthenticationError
        No ``threshold``-subset reconstructs a secret that matches the shares' check tag
        (tampered shares).
    """
    parsed = [Share.from_bytes(s) for s in shares]
    if not parsed:
        raise CryptoError("No Shamir shares given; need at least the threshold.")
    first = parsed[0]
    for s in parsed[1:]:
        if (s.threshold, s.secret_len, s.check) != (first.threshold, first.secret_len, first.check):
            raise CryptoError(
                "Shamir shares belong to different secrets (header or check differs)."
            )
    xs = [s.x for s in parsed]
    if len(set(xs)) != len(xs):
        raise CryptoError(f"Shamir shares have duplicate x coordinates: {sorted(xs)}.")
    t = first.threshold
    if len(parsed) < t:
        raise CryptoError(f"Need at least {t} Shamir shares to reconstruct, got {len(parsed)}.")
    points = [(s.x, s.y) for s in parsed]
    for subset in itertools.islice(itertools.combinations(points, t), _MAX_SUBSETS):
        value = _interpolate_at_zero(list(subset))
        if value >> (8 * first.secret_len):
            continue
        secret = value.to_bytes(first.secret_len, "big")
        if secrets.compare_digest(_check_tag(secret), first.check):
            return secret
    raise AuthenticationError(
        "Shamir shares are inconsistent: the reconstructed secret fails its check."
    )
