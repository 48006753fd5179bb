"""The enclave interface: quotes, their verification against an allow-list, and the Enclave ABC.

A :class:`Quote` is what an attested enclave hands a remote verifier: the enclave's measurement
(a hash of its code and configuration), the verifier's fresh nonce, ``report_data`` (the raw
Ed25519 public key of the enclave's identity, to which the verifier then keys its channel) and a
platform signature over all three. Wire layout of :meth:`Quote.to_bytes` (integers big-endian)::

    b"SQT1"            4 bytes   magic (the "1" is the layout generation)
    backend_length     1 byte    1..32
    backend            N bytes   ASCII, e.g. "simulated"
    measurement        32 bytes  SHA-256
    nonce_length       1 byte    16..64
    nonce              N bytes
    report_length      2 bytes   0..1024
    report_data        N bytes
    signature          64 bytes  Ed25519 over b"silotune/quote/v1\\x00" || everything above

:func:`verify_quote` never returns False: every failed check raises :class:`AttestationError`.
"""

from __future__ import annotations

import hmac
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch

from silotune.crypto.exceptions import CryptoError
from silotune.crypto.identity import PublicIdentity
from silotune.errors import AttestationError, EnclaveError

__all__ = [
    "BACKENDS",
    "MEASUREMENT_SIZE",
    "MIN_NONCE_SIZE",
    "AttestationError",
    "AttestationPolicy",
    "Enclave",
    "EnclaveError",
    "OcallHandler",
    "Quote",
    "quote_message",
    "verify_quote",
]

BACKENDS = frozenset({"simulated"})
MEASUREMENT_SIZE = 32
MIN_NONCE_SIZE = 16
MAX_NONCE_SIZE = 64
MAX_REPORT_DATA = 1024
SIGNATURE_SIZE = 64
MAX_BACKEND_CHARS = 32
QUOTE_MAGIC = b"SQT1"
QUOTE_CONTEXT = b"silotune/quote/v1\x00"  # domain separation: a quote signature signs nothing else
MAX_QUOTE_BYTES = 4 + 1 + MAX_BACKEND_CHARS + 32 + 1 + MAX_NONCE_SIZE + 2 + MAX_REPORT_DATA + 64

# A call's named values: tensors, or opaque bytes (a sealed blob) that travel in the frame's data
# section, never disguised as tensors.
Tensors = dict[str, torch.Tensor | bytes]
OcallHandler = Callable[[str, dict[str, Any], Tensors], tuple[dict[str, Any], Tensors]]
"""Serves an enclave's call back into the host: ``(method, meta, tensors) -> (meta, tensors)``."""


@dataclass(frozen=True)
class Quote:
    """A signed statement by the platform: this measurement answered this nonce with this key.

    Parameters
    ----------
    backend
        Which kind of enclave produced the quote (``"simulated"``).
    measurement
        SHA-256 of the enclave's code and configuration (32 bytes).
    nonce
        The verifier's fresh challenge (16..64 bytes).
    report_data
        Data the enclave binds into the quote: the raw public key of its identity.
    signature
        The platform key's Ed25519 signature over :func:`quote_message`.
    """

    backend: str
    measurement: bytes
    nonce: bytes
    report_data: bytes
    signature: bytes = b""

    def __post_init__(self) -> None:
        backend = self.backend.encode("ascii", "replace") if isinstance(self.backend, str) else b""
        if not 0 < len(backend) <= MAX_BACKEND_CHARS or not self.backend.isascii():
            raise AttestationError(
                f"quote backend must be 1..{MAX_BACKEND_CHARS} ASCII characters, "
                f"got {self.backend!r}"
            )
        checks = (
            ("measurement", self.measurement, MEASUREMENT_SIZE, MEASUREMENT_SIZE),
            ("nonce", self.nonce, MIN_NONCE_SIZE, MAX_NONCE_SIZE),
            ("report_data", self.report_data, 0, MAX_REPORT_DATA),
        )
        for name, value, low, high in checks:
            if not isinstance(value, bytes) or not low <= len(value) <= high:
                size = len(value) if isinstance(value, bytes) else type(value).__name__
                raise AttestationError(
                    f"quote {name} must be {low}..{high} bytes, got {size}"
                    if low != high
                    else f"quote {name} must be {low} bytes, got {size}"
                )
        if not isinstance(self.signature, bytes) or len(self.signature) not in (0, SIGNATURE_SIZE):
            raise AttestationError(f"quote signature must be {SIGNATURE_SIZE} bytes")

    def body(self) -> bytes:
        """Everything but the signature, in wire layout."""
        backend = self.backend.encode("ascii")
        return b"".join(
            (
                QUOTE_MAGIC,
                struct.pack(">B", len(backend)),
                backend,
                self.measurement,
                struct.pack(">B", len(self.nonce)),
                self.nonce,
                struct.pack(">H", len(self.report_data)),
                self.report_data,
            )
        )

    def to_bytes(self) -> bytes:
        """The signed quote in wire layout (see the module docstring)."""
        if len(self.signature) != SIGNATURE_SIZE:
            raise AttestationError("an unsigned quote cannot be sent; sign it first")
        return self.body() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> Quote:
        """Parse a quote received from an untrusted host; every length is checked.

        Raises
        ------
        AttestationError
            If the bytes are not one well-formed quote.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise AttestationError(f"a quote is bytes, got {type(data).__name__}")
        raw = bytes(data)
        if len(raw) > MAX_QUOTE_BYTES:
            raise AttestationError(f"quote is {len(raw)} bytes; at most {MAX_QUOTE_BYTES}")
        reader = _Reader(raw)
        if reader.take(4) != QUOTE_MAGIC:
            raise AttestationError(f"not a quote: it does not start with {QUOTE_MAGIC!r}")
        backend_raw = reader.take(reader.unpack(">B"))
        measurement = reader.take(MEASUREMENT_SIZE)
        nonce = reader.take(reader.unpack(">B"))
        report_data = reader.take(reader.unpack(">H"))
        signature = reader.take(SIGNATURE_SIZE)
        if reader.left:
            raise AttestationError(f"quote has {reader.left} trailing bytes")
        try:
            backend = backend_raw.decode("ascii")
        except UnicodeDecodeError:
            raise AttestationError("quote backend is not ASCII") from None
        return cls(backend, measurement, nonce, report_data, signature)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    @property
    def left(self) -> int:
        return len(self._data) - self._pos

    def take(self, size: int) -> bytes:
        if size > self.left:
            raise AttestationError(
                f"quote is truncated: {size} more bytes expected, {self.left} left"
            )
        chunk = self._data[self._pos : self._pos + size]
        self._pos += size
        return chunk

    def unpack(self, fmt: str) -> int:
        value: int = struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        return value


def quote_message(quote: Quote) -> bytes:
    """The exact bytes the platform key signs for ``quote`` (domain-separated)."""
    return QUOTE_CONTEXT + quote.body()


@dataclass(frozen=True)
class AttestationPolicy:
    """What a verifier accepts: the platform (vendor) key and the allow-listed measurements.

    Parameters
    ----------
    platform_key
        The platform's public key; only quotes it signed are accepted.
    allowed_measurements
        Measurements (32 bytes each) of enclaves the verifier trusts; must not be empty.
    backends
        Backends whose quotes are accepted.
    """

    platform_key: PublicIdentity
    allowed_measurements: frozenset[bytes]
    backends: frozenset[str] = field(default=BACKENDS)

    def __post_init__(self) -> None:
        if not self.allowed_measurements:
            raise AttestationError("an attestation policy needs at least one allowed measurement")
        for item in self.allowed_measurements:
            if not isinstance(item, bytes) or len(item) != MEASUREMENT_SIZE:
                raise AttestationError(
                    f"allowed measurements are {MEASUREMENT_SIZE}-byte SHA-256 digests"
                )

    @classmethod
    def from_hex(
        cls, platform_key: PublicIdentity, measurements: Iterable[str]
    ) -> AttestationPolicy:
        """A policy from hex measurements (as in ``enclave.allowed_measurements``)."""
        try:
            allowed = frozenset(bytes.fromhex(m) for m in measurements)
        except ValueError:
            raise AttestationError("allowed measurements must be hex SHA-256 digests") from None
        return cls(platform_key, allowed)


def verify_quote(quote: Quote | bytes, policy: AttestationPolicy, expected_nonce: bytes) -> Quote:
    """Check a quote against ``policy`` and the verifier's own fresh nonce; return it if good.

    Parameters
    ----------
    quote
        The quote, parsed or as received.
    policy
        Platform key and allow-list.
    expected_nonce
        The random nonce (>= 16 bytes) this verifier sent for this attestation; a quote carrying
        any other nonce is a replay (or an answer to someone else's challenge).

    Raises
    ------
    AttestationError
        With one sentence: unknown backend, bad signature, measurement not allow-listed, or stale
        nonce. Never returns a quote that failed a check.
    """
    if not isinstance(expected_nonce, bytes) or len(expected_nonce) < MIN_NONCE_SIZE:
        raise AttestationError(f"the verifier's nonce must be at least {MIN_NONCE_SIZE} bytes")
    parsed = quote if isinstance(quote, Quote) else Quote.from_bytes(quote)
    if parsed.backend not in policy.backends:
        raise AttestationError(
            f"quote comes from backend {parsed.backend!r}; accepted: {sorted(policy.backends)}"
        )
    try:
        policy.platform_key.verify(parsed.signature, quote_message(parsed))
    except (CryptoError, TypeError, ValueError):
        raise AttestationError(
            "quote signature does not verify under the platform key "
            f"{policy.platform_key.fingerprint()} (forged, tampered or another platform)"
        ) from None
    if parsed.measurement not in policy.allowed_measurements:
        raise AttestationError(
            f"enclave measurement {parsed.measurement.hex()} is not in the allow-list "
            "(enclave.allowed_measurements); the enclave runs other code or configuration"
        )
    if not hmac.compare_digest(parsed.nonce, expected_nonce):
        raise AttestationError(
            "quote answers another nonce than this verifier's fresh one (a replayed quote)"
        )
    return parsed


class Enclave(ABC):
    """An isolated execution environment with a measurement, quotes, sealing and a call interface.

    Use as a context manager; :meth:`close` ends the enclave and wipes what it held in memory.
    """

    @property
    @abstractmethod
    def measurement(self) -> bytes:
        """SHA-256 of the enclave's code and configuration (32 bytes)."""

    @abstractmethod
    def attest(self, nonce: bytes) -> Quote:
        """A quote binding the measurement, ``nonce`` and the enclave's identity public key."""

    @abstractmethod
    def call(
        self,
        method: str,
        meta: dict[str, Any],
        tensors: Tensors,
        ocall: OcallHandler | None = None,
    ) -> tuple[dict[str, Any], Tensors]:
        """Run ``method`` of the enclave's app; serve its ocalls with ``ocall`` meanwhile.

        Raises
        ------
        EnclaveError
            If the app raised (its message is in the error) or the enclave is gone.
        """

    @abstractmethod
    def close(self) -> None:
        """End the enclave; idempotent."""

    def __enter__(self) -> Enclave:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
