"""Ed25519 identity keys of silos and servers: PEM files, fingerprints, the enrollment list.

An identity key is long-lived: it signs handshake transcripts (see ``handshake.py``) and never
encrypts anything itself. A silo is trusted by a server only when its *public* identity is in the
server's :class:`Enrollment`; a client trusts a server only when the server's public identity equals
the one it pinned (from configuration or, for an enclave, from an attestation quote).

Invariants
----------
- Private key files are written atomically (temporary file in the same folder, ``fsync``, rename)
  with mode 0600, and never silently replace an existing key: losing an identity key locks a silo
  out of every job it is enrolled in.
- Loading a private key file that group or others can read is refused (as OpenSSH does).
- A fingerprint (16 hex digits of SHA-256 of the raw public key) is for logs and documents only;
  pin and enroll the full 32-byte key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from silotune.crypto.exceptions import AuthenticationError, KeyMaterialError, UnknownIdentityError
from silotune.files import atomic_write

PUBLIC_KEY_SIZE = 32
PRIVATE_KEY_SIZE = 32
SIGNATURE_SIZE = 64
FINGERPRINT_HEX_DIGITS = 16

ENROLLMENT_FORMAT = "silotune-enrollment"
ENROLLMENT_VERSION = 1
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _require_bytes(name: str, value: object) -> bytes:
    """Return ``value`` as bytes; raise TypeError naming ``name`` if it is not bytes-like."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{name} must be bytes, got {type(value).__name__}")


def fingerprint(public_bytes: bytes) -> str:
    """Short hex digest of a raw 32-byte public key, for logs and documents (never for pinning)."""
    raw = _require_bytes("public_bytes", public_bytes)
    return hashlib.sha256(raw).hexdigest()[:FINGERPRINT_HEX_DIGITS]


class PublicIdentity:
    """The public half of an identity: 32 raw Ed25519 bytes; verifies transcript signatures."""

    __slots__ = ("_key", "_raw")

    def __init__(self, key: Ed25519PublicKey) -> None:
        if not isinstance(key, Ed25519PublicKey):
            raise TypeError(f"key must be an Ed25519PublicKey, got {type(key).__name__}")
        self._key = key
        self._raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicIdentity:
        """Load a raw 32-byte Ed25519 public key (from a handshake or an attestation quote)."""
        raw = _require_bytes("data", data)
        if len(raw) != PUBLIC_KEY_SIZE:
            raise KeyMaterialError(
                f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes, got {len(raw)} bytes"
            )
        try:
            return cls(Ed25519PublicKey.from_public_bytes(raw))
        except ValueError as exc:
            raise KeyMaterialError(f"invalid Ed25519 public key: {exc}") from None

    @classmethod
    def from_hex(cls, text: str) -> PublicIdentity:
        """Load a public key written as 64 hex digits (as in an enrollment file)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        try:
            raw = bytes.fromhex(text.strip())
        except ValueError:
            raise KeyMaterialError(
                f"public key {text.strip()[:80]!r} is not hex; expected "
                f"{2 * PUBLIC_KEY_SIZE} hex digits"
            ) from None
        return cls.from_bytes(raw)

    @classmethod
    def from_pem(cls, data: bytes) -> PublicIdentity:
        """Load a PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo) block holding an Ed25519 key."""
        pem = _require_bytes("data", data)
        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError as exc:
            raise KeyMaterialError(f"not a PEM public key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyMaterialError(f"expected an Ed25519 public key, got {type(key).__name__}")
        return cls(key)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PublicIdentity:
        """Read a public key PEM file written by :meth:`save`."""
        return cls.from_pem(Path(path).read_bytes())

    def public_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        return self._raw

    def hex(self) -> str:
        """The raw public key as 64 lowercase hex digits."""
        return self._raw.hex()

    def to_pem(self) -> bytes:
        """The key as a PEM ``PUBLIC KEY`` block."""
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the PEM public key atomically, mode 0644."""
        atomic_write(Path(path), self.to_pem(), 0o644, overwrite=overwrite)

    def fingerprint(self) -> str:
        """16 hex digits of SHA-256 of the raw key, for logs and documents."""
        return fingerprint(self._raw)

    def verify(self, signature: bytes, data: bytes) -> None:
        """Raise AuthenticationError unless ``signature`` is this key's signature of ``data``."""
        sig = _require_bytes("signature", signature)
        msg = _require_bytes("data", data)
        try:
            self._key.verify(sig, msg)
        except InvalidSignature:
            raise AuthenticationError(
                f"signature does not verify under identity {self.fingerprint()}"
            ) from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PublicIdentity):
            return NotImplemented
        return hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"PublicIdentity(fingerprint={self.fingerprint()!r})"


class IdentityKey:
    """A long-lived Ed25519 signing key (private); ``repr`` and ``str`` never show secret bytes."""

    __slots__ = ("_key", "_public")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError(f"key must be an Ed25519PrivateKey, got {type(key).__name__}")
        self._key = key
        self._public = PublicIdentity(key.public_key())

    @classmethod
    def generate(cls) -> IdentityKey:
        """A fresh key from the operating system's CSPRNG."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> IdentityKey:
        """Load a raw 32-byte Ed25519 private key (seed); used by tests and key import."""
        raw = _require_bytes("data", data)
        if len(raw) != PRIVATE_KEY_SIZE:
            raise KeyMaterialError(
                f"an Ed25519 private key is {PRIVATE_KEY_SIZE} bytes, got {len(raw)} bytes"
            )
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def from_pem(cls, data: bytes, *, password: bytes | None = None) -> IdentityKey:
        """Load a PKCS#8 PEM ``PRIVATE KEY`` block holding an Ed25519 key."""
        pem = _require_bytes("data", data)
        try:
            key = serialization.load_pem_private_key(pem, password=password)
        except TypeError as exc:  # password given for a plain key, or missing for an encrypted one
            raise KeyMaterialError(f"cannot load private key: {exc}") from None
        except ValueError as exc:  # malformed PEM or wrong password
            raise KeyMaterialError(
                f"cannot load private key (bad PEM or wrong password): {exc}"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyMaterialError(f"expected an Ed25519 private key, got {type(key).__name__}")
        return cls(key)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, password: bytes | None = None) -> IdentityKey:
        """Read a private key file written by :meth:`save`; refuse one that others can read."""
        path = Path(path)
        if os.name == "posix":
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                raise KeyMaterialError(
                    f"private key file {path} is readable by group or others (mode {mode:04o}); "
                    f"run 'chmod 600 {path}'"
                )
        return cls.from_pem(path.read_bytes(), password=password)

    def to_pem(self, *, password: bytes | None = None) -> bytes:
        """The key as PKCS#8 PEM, encrypted with ``password`` when one is given."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password is not None
            else serialization.NoEncryption()
        )
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        password: bytes | None = None,
        overwrite: bool = False,
    ) -> None:
        """Write the PEM private key atomically, mode 0600; never replace a file unless asked."""
        atomic_write(Path(path), self.to_pem(password=password), 0o600, overwrite=overwrite)

    @property
    def public(self) -> PublicIdentity:
        """The matching public identity."""
        return self._public

    def public_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        return self._public.public_bytes()

    def fingerprint(self) -> str:
        """Fingerprint of the public key (see :func:`fingerprint`)."""
        return self._public.fingerprint()

    def sign(self, data: bytes) -> bytes:
        """A 64-byte Ed25519 signature of ``data`` (deterministic, RFC 8032)."""
        return self._key.sign(_require_bytes("data", data))

    def __repr__(self) -> str:
        return f"IdentityKey(fingerprint={self.fingerprint()!r})"


def _as_public(value: PublicIdentity | bytes) -> PublicIdentity:
    if isinstance(value, PublicIdentity):
        return value
    return PublicIdentity.from_bytes(value)


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a silo name must be str, got {type(name).__name__}")
    if _NAME_PATTERN.fullmatch(name) is None:
        raise ValueError(
            f"silo name {name!r} is not allowed; use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return name


class Enrollment:
    """The allow-list of silos a server accepts: name -> Ed25519 public identity, one key per name.

    File format (JSON, UTF-8)::

        {"format": "silotune-enrollment", "version": 1,
         "silos": {"<name>": "<64 hex digits of the raw public key>", ...}}
    """

    def __init__(self, members: Mapping[str, PublicIdentity | bytes] | None = None) -> None:
        self._by_name: dict[str, PublicIdentity] = {}
        self._by_key: dict[bytes, str] = {}
        for name, public in (members or {}).items():
            self.add(name, public)

    def add(self, name: str, public: PublicIdentity | bytes) -> None:
        """Enroll ``public`` under ``name``; a name or a key can be enrolled only once."""
        name = _check_name(name)
        identity = _as_public(public)
        if name in self._by_name:
            raise ValueError(f"silo {name!r} is already enrolled; remove it first")
        other = self._by_key.get(identity.public_bytes())
        if other is not None:
            raise ValueError(f"identity {identity.fingerprint()} is already enrolled as {other!r}")
        self._by_name[name] = identity
        self._by_key[identity.public_bytes()] = name

    def remove(self, name: str) -> None:
        """Withdraw a silo; its next handshake fails with UnknownIdentityError."""
        identity = self.get(name)
        del self._by_name[name]
        del self._by_key[identity.public_bytes()]

    def get(self, name: str) -> PublicIdentity:
        """The public identity enrolled under ``name``."""
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownIdentityError(f"no silo named {name!r} is enrolled") from None

    def name_of(self, public: PublicIdentity | bytes) -> str:
        """The name ``public`` is enrolled under; UnknownIdentityError names its fingerprint."""
        identity = _as_public(public)
        name = self._by_key.get(identity.public_bytes())
        if name is None:
            raise UnknownIdentityError(
                f"identity {identity.fingerprint()} is not enrolled "
                f"({len(self._by_name)} silo(s) enrolled); add its public key to the enrollment"
            )
        return name

    def names(self) -> list[str]:
        """Enrolled names, sorted."""
        return sorted(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._by_name)

    def __repr__(self) -> str:
        return f"Enrollment(names={self.names()!r})"

    def to_json(self) -> str:
        """The enrollment file's text (stable: sorted names, trailing newline)."""
        document = {
            "format": ENROLLMENT_FORMAT,
            "version": ENROLLMENT_VERSION,
            "silos": {name: self._by_name[name].hex() for name in self.names()},
        }
        return json.dumps(document, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "enrollment") -> Enrollment:
        """Parse an enrollment document; every problem raises KeyMaterialError naming ``source``."""

        def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            seen: dict[str, Any] = {}
            for key, value in pairs:
                if key in seen:
                    raise KeyMaterialError(f"{source}: key {key!r} appears twice")
                seen[key] = value
            return seen

        try:
            document = json.loads(text, object_pairs_hook=no_duplicates)
        except json.JSONDecodeError as exc:
            raise KeyMaterialError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(document, dict) or document.get("format") != ENROLLMENT_FORMAT:
            raise KeyMaterialError(f"{source}: not a silotune enrollment (format field missing)")
        version = document.get("version")
        if version != ENROLLMENT_VERSION:
            raise KeyMaterialError(
                f"{source}: enrollment version {version!r} is not supported; "
                f"supported: {ENROLLMENT_VERSION}"
            )
        silos = document.get("silos")
        if not isinstance(silos, dict):
            raise KeyMaterialError(f"{source}: 'silos' must be an object mapping name -> hex key")
        enrollment = cls()
        for name, value in silos.items():
            if not isinstance(value, str):
                raise KeyMaterialError(f"{source}: key of silo {name!r} must be a hex string")
            try:
                enrollment.add(name, PublicIdentity.from_hex(value))
            except (ValueError, KeyMaterialError) as exc:
                raise KeyMaterialError(f"{source}: silo {name!r}: {exc}") from None
        return enrollment

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the enrollment file atomically (mode 0644), replacing the previous version."""
        atomic_write(Path(path), self.to_json().encode("utf-8"), 0o644, overwrite=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Enrollment:
        """Read an enrollment file written by :meth:`save`."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise KeyMaterialError(f"{path}: not UTF-8 text") from None
        return cls.from_json(text, source=str(path))
