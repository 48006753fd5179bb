"""Sealed boxes between silos through the coordinator: static X25519, HKDF, AES-256-GCM.

Each silo holds one X25519 transport key per job (kept in its own node state). A payload from silo
``a`` to silo ``b`` (a Shamir share bundle, the HE secret context) is encrypted under
``HKDF(X25519(sk_a, pk_b))`` with a random 96-bit nonce; the associated data binds the purpose, the
round and both silos' public keys, so the coordinator that relays it can neither read it nor move
it to another round, purpose or recipient: any change raises :class:`AuthenticationError`.

Trust: public keys are relayed by the coordinator. Against an honest-but-curious coordinator (the
model of docs/federated.md) this is end-to-end; a coordinator that substitutes keys is stopped
only when silos pin each other's keys (Ed25519 identities, ``silotune.crypto.identity``).
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from silotune.crypto.exceptions import AuthenticationError, KeyMaterialError
from silotune.crypto.x25519 import check_public_key

VERSION = 1
_SALT = b"silotune/federated/seal/v1"
_NONCE = 12


def new_transport_key() -> X25519PrivateKey:
    """A fresh X25519 transport key for one silo and job."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32-byte raw public key."""
    return key.public_key().public_bytes_raw()


def _key(own: X25519PrivateKey, peer_public: bytes, purpose: bytes) -> tuple[AESGCM, bytes]:
    peer_public = check_public_key(peer_public, "peer transport key")
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise KeyMaterialError(f"X25519 exchange failed: {exc}") from exc
    mine = public_bytes(own)
    lo, hi = sorted((mine, peer_public))
    key = HKDF(hashes.SHA256(), 32, _SALT, b"key|" + purpose + b"|" + lo + hi).derive(shared)
    return AESGCM(key), mine


def _aad(purpose: bytes, round_no: int, sender: bytes, recipient: bytes) -> bytes:
    return struct.pack(">BQ", VERSION, round_no) + purpose + b"|" + sender + recipient


def seal(
    own: X25519PrivateKey, peer_public: bytes, purpose: bytes, round_no: int, plaintext: bytes
) -> bytes:
    """Encrypt `plaintext` for the holder of `peer_public` (version, nonce, ciphertext+tag)."""
    aead, mine = _key(own, peer_public, purpose)
    nonce = os.urandom(_NONCE)
    body = aead.encrypt(nonce, plaintext, _aad(purpose, round_no, mine, peer_public))
    return bytes([VERSION]) + nonce + body


def open_sealed(
    own: X25519PrivateKey,
    sender_public: bytes,
    purpose: bytes,
    round_no: int,
    sealed: bytes,
    what: str,
) -> bytes:
    """Decrypt a payload sealed by the holder of `sender_public`; `what` names it in errors."""
    if len(sealed) < 1 + _NONCE + 16 or sealed[0] != VERSION:
        raise AuthenticationError(f"{what} is truncated or has an unknown version.")
    aead, mine = _key(own, sender_public, purpose)
    try:
        return aead.decrypt(
            sealed[1 : 1 + _NONCE],
            sealed[1 + _NONCE :],
            _aad(purpose, round_no, sender_public, mine),
        )
    except InvalidTag:
        raise AuthenticationError(
            f"{what} failed authentication: it was tampered with, replayed from another round, "
            "or sealed for another silo."
        ) from None
