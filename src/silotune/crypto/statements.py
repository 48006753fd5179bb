"""Signed statements: what a silo vouches for with its Ed25519 identity, bound to job and round.

A statement is canonical JSON (sorted keys, no spaces) behind a fixed prefix, holding a purpose,
the job id, the round and the purpose's fields, so a signature made for one purpose, job or round
never verifies for another (no cross-protocol or replay use). Bytes fields are hex. Verification
raises :class:`~silotune.crypto.exceptions.AuthenticationError`; it never returns False.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from silotune.crypto.exceptions import AuthenticationError
from silotune.crypto.identity import SIGNATURE_SIZE, IdentityKey, PublicIdentity

__all__ = ["digest", "sign", "statement", "verify"]

_PREFIX = b"silotune/statement/v1|"
Field = str | int | float | bool | bytes | list[int] | None


def _plain(value: Field) -> str | int | float | bool | list[int] | None:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return value


def statement(purpose: str, job: bytes, round_id: int, fields: Mapping[str, Field]) -> bytes:
    """The canonical bytes a signature covers."""
    if {"purpose", "job", "round"} & set(fields):
        raise ValueError("statement fields must not be named purpose, job or round")
    doc = {"purpose": purpose, "job": bytes(job).hex(), "round": int(round_id)}
    doc.update({k: _plain(v) for k, v in fields.items()})
    return _PREFIX + json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def sign(
    key: IdentityKey, purpose: str, job: bytes, round_id: int, fields: Mapping[str, Field]
) -> bytes:
    """A 64-byte Ed25519 signature of :func:`statement`."""
    return key.sign(statement(purpose, job, round_id, fields))


def verify(
    public: PublicIdentity,
    signature: object,
    purpose: str,
    job: bytes,
    round_id: int,
    fields: Mapping[str, Field],
    what: str,
) -> None:
    """Raise AuthenticationError naming ``what`` unless ``signature`` covers this statement."""
    if not isinstance(signature, (bytes, bytearray)) or len(signature) != SIGNATURE_SIZE:
        raise AuthenticationError(f"{what}: the signature is missing or not {SIGNATURE_SIZE} bytes")
    try:
        public.verify(bytes(signature), statement(purpose, job, round_id, fields))
    except AuthenticationError:
        raise AuthenticationError(
            f"{what}: the signature does not verify under identity {public.fingerprint()}"
        ) from None


def digest(*parts: bytes) -> bytes:
    """SHA-256 over length-prefixed parts (unambiguous concatenation)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big") + part)
    return h.digest()
