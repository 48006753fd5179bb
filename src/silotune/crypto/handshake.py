"""Authenticated X25519 handshake between a silo (client) and a coordinator or enclave (server).

No I/O here: each side turns received bytes into the bytes to send, and the transport carries them.

    client = ClientHandshake(silo_key, pinned_server_public)
    server = ServerHandshake(server_key, enrollment)
    hello = client.hello()                      # client -> server, 103 bytes
    response = server.respond(hello)            # server -> client, 167 bytes
    client_keys, confirm = client.finish(response)
    server_keys = server.finish(confirm)        # confirm: client -> server, 102 bytes

Wire format (fixed binary layouts, integers big-endian, never pickle)::

    every message  magic "STHS" | version u8 (= 1) | type u8
    hello    (1)   cipher u8 | client identity 32 | client ephemeral 32 | client nonce 32
    response (2)   cipher u8 | server identity 32 | server ephemeral 32 | server nonce 32 | sig 64
    confirm  (3)   client signature 64 | client key-confirmation MAC 32

Security invariants
-------------------
- Transcript hash ``TH = SHA-256(LABEL | version | cipher | len(context) u32 | context | "client" |
  client identity | client ephemeral | client nonce | "server" | server identity | server ephemeral
  | server nonce)``. Every field of hello and response is in it (all fixed-size, so the
  concatenation is unambiguous), plus the application ``context`` both sides must agree on (a job
  id, or the hash of an attestation quote) that never travels on the wire.
- The server signs ``"silotune/handshake/v1 server\\0" | TH`` and the client signs the same with
  ``client``: the role labels keep a signature from being reflected to the other role. Since both
  signatures cover both identities and both ephemeral keys, a man in the middle who swaps an
  ephemeral key or an identity breaks a signature.
- The client accepts only the server identity it pinned (:class:`ClientHandshake` takes any
  :class:`PublicIdentity`, so the pin can come from configuration or from an attestation quote whose
  report data carries the enclave's Ed25519 public key). The server accepts only enrolled silos, and
  checks this before doing any public-key work.
- Keys: ``HKDF-SHA256(ikm = X25519(eph_c, eph_s), salt = TH, info = LABEL " keys")`` gives 128
  bytes = client->server secret | server->client secret | session id | confirm key. The client's
  confirm MAC (``HMAC-SHA256(confirm key, "client finished" | TH)``) proves it derived the same
  keys.
- Ephemeral keys are fresh per handshake and dropped when it ends, so a stolen identity key does
  not decrypt past sessions (forward secrecy). Each handshake object is single-use; any failure is
  final.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import NamedTuple

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from silotune.crypto.exceptions import (
    AuthenticationError,
    CryptoError,
    HandshakeError,
    KeyMaterialError,
    UnknownIdentityError,
)
from silotune.crypto.identity import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    Enrollment,
    IdentityKey,
    PublicIdentity,
    fingerprint,
)

PROTOCOL_VERSION = 1
MAGIC = b"STHS"
LABEL = b"silotune/handshake/v1"
NONCE_SIZE = 32
EPHEMERAL_SIZE = 32  # raw X25519 public key
SECRET_SIZE = 32
MAC_SIZE = 32

MSG_HELLO = 1
MSG_RESPONSE = 2
MSG_CONFIRM = 3
_MESSAGE_NAMES = {MSG_HELLO: "hello", MSG_RESPONSE: "response", MSG_CONFIRM: "confirm"}

_PREFIX = struct.Struct(">4sBB")  # magic, version, type
_BODY_SIZE = PUBLIC_KEY_SIZE + EPHEMERAL_SIZE + NONCE_SIZE  # identity | ephemeral | nonce
HELLO_SIZE = _PREFIX.size + 1 + _BODY_SIZE
RESPONSE_SIZE = _PREFIX.size + 1 + _BODY_SIZE + SIGNATURE_SIZE
CONFIRM_SIZE = _PREFIX.size + SIGNATURE_SIZE + MAC_SIZE


def _require_size(name: str, value: object, size: int) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
    if len(value) != size:
        raise KeyMaterialError(f"{name} must be {size} bytes, got {len(value)}")


class Cipher(enum.Enum):
    """AEAD used by the channel; the value is the wire id (part of the signed transcript)."""

    AES_256_GCM = 1
    CHACHA20_POLY1305 = 2

    @property
    def label(self) -> str:
        """Name used in configs and logs, e.g. ``aes-256-gcm``."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_name(cls, name: str) -> Cipher:
        """Parse ``aes-256-gcm`` or ``chacha20-poly1305`` (as written in a config)."""
        for cipher in cls:
            if cipher.label == name:
                return cipher
        allowed = ", ".join(c.label for c in cls)
        raise ValueError(f"unknown cipher {name!r}; allowed: {allowed}")


class Role(enum.Enum):
    """Which end of a session a party is: the silo is the client, coordinator/enclave the server."""

    CLIENT = "client"
    SERVER = "server"


class SessionKeys:
    """Result of a handshake: two directional traffic secrets, the session id, the agreed cipher.

    ``repr`` shows no secret. A :class:`~silotune.crypto.channel.SecureChannel` *claims* the keys
    for one role, and a second claim for the same role is refused: two channels sealing with the
    same key from sequence number 0 would reuse nonces.
    """

    __slots__ = (
        "_claimed",
        "_client_to_server",
        "_server_to_client",
        "cipher",
        "client_identity",
        "client_name",
        "server_identity",
        "session_id",
    )

    def __init__(
        self,
        *,
        session_id: bytes,
        client_to_server: bytes,
        server_to_client: bytes,
        cipher: Cipher = Cipher.AES_256_GCM,
        client_identity: PublicIdentity | None = None,
        server_identity: PublicIdentity | None = None,
        client_name: str | None = None,
    ) -> None:
        _require_size("session_id", session_id, SECRET_SIZE)
        _require_size("client_to_server", client_to_server, SECRET_SIZE)
        _require_size("server_to_client", server_to_client, SECRET_SIZE)
        if not isinstance(cipher, Cipher):
            raise TypeError(f"cipher must be a Cipher, got {type(cipher).__name__}")
        self.session_id = session_id
        self.cipher = cipher
        self.client_identity = client_identity
        self.server_identity = server_identity
        self.client_name = client_name
        self._client_to_server = client_to_server
        self._server_to_client = server_to_client
        self._claimed: set[Role] = set()

    def _claim(self, role: Role) -> tuple[bytes, bytes]:
        """Hand (sending secret, receiving secret) of ``role`` to its one channel."""
        if role in self._claimed:
            raise CryptoError(
                f"these session keys already back a {role.value} channel; a second one would "
                "reuse nonces, so run a new handshake instead"
            )
        self._claimed.add(role)
        if role is Role.CLIENT:
            return self._client_to_server, self._server_to_client
        return self._server_to_client, self._client_to_server

    def __repr__(self) -> str:
        client = self.client_identity.fingerprint() if self.client_identity else None
        server = self.server_identity.fingerprint() if self.server_identity else None
        return (
            f"SessionKeys(session_id={self.session_id.hex()[:16]}..., cipher={self.cipher.label}, "
            f"client={client}, client_name={self.client_name!r}, server={server})"
        )


class HandshakeSecrets(NamedTuple):
    """Output of :func:`key_schedule`."""

    client_to_server: bytes
    server_to_client: bytes
    session_id: bytes
    confirm_key: bytes


def transcript_hash(
    *,
    cipher: Cipher,
    context: bytes,
    client_identity: bytes,
    client_ephemeral: bytes,
    client_nonce: bytes,
    server_identity: bytes,
    server_ephemeral: bytes,
    server_nonce: bytes,
) -> bytes:
    """SHA-256 of the handshake transcript (layout in the module docstring)."""
    _require_size("client_identity", client_identity, PUBLIC_KEY_SIZE)
    _require_size("client_ephemeral", client_ephemeral, EPHEMERAL_SIZE)
    _require_size("client_nonce", client_nonce, NONCE_SIZE)
    _require_size("server_identity", server_identity, PUBLIC_KEY_SIZE)
    _require_size("server_ephemeral", server_ephemeral, EPHEMERAL_SIZE)
    _require_size("server_nonce", server_nonce, NONCE_SIZE)
    parts = [
        LABEL,
        struct.pack(">BBI", PROTOCOL_VERSION, cipher.value, len(context)),
        context,
        b"client",
        client_identity,
        client_ephemeral,
        client_nonce,
        b"server",
        server_identity,
        server_ephemeral,
        server_nonce,
    ]
    return hashlib.sha256(b"".join(parts)).digest()


def key_schedule(shared_secret: bytes, transcript: bytes) -> HandshakeSecrets:
    """HKDF-SHA256(ikm=shared_secret, salt=transcript hash) -> the four 32-byte session values."""
    okm = HKDF(
        algorithm=hashes.SHA256(), length=4 * SECRET_SIZE, salt=transcript, info=LABEL + b" keys"
    ).derive(shared_secret)
    n = SECRET_SIZE
    return HandshakeSecrets(okm[:n], okm[n : 2 * n], okm[2 * n : 3 * n], okm[3 * n :])


def _signed_message(role: Role, transcript: bytes) -> bytes:
    return LABEL + b" " + role.value.encode("ascii") + b"\x00" + transcript


def _confirm_mac(confirm_key: bytes, transcript: bytes) -> bytes:
    return hmac.new(confirm_key, b"client finished" + transcript, hashlib.sha256).digest()


def _check_message(data: object, msg_type: int, size: int) -> bytes:
    """Validate the common prefix and length of a handshake message; return it as bytes."""
    what = _MESSAGE_NAMES[msg_type]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"handshake {what} must be bytes, got {type(data).__name__}")
    raw = bytes(data)
    if len(raw) < _PREFIX.size:
        raise HandshakeError(f"handshake {what} is {len(raw)} bytes, too short for a header")
    magic, version, got_type = _PREFIX.unpack_from(raw)
    if magic != MAGIC:
        raise HandshakeError(
            f"not a silotune handshake message (magic {magic!r}, expected {MAGIC!r})"
        )
    if version != PROTOCOL_VERSION:
        raise HandshakeError(
            f"handshake version {version} is not supported; this side speaks version "
            f"{PROTOCOL_VERSION}"
        )
    if got_type != msg_type:
        got = _MESSAGE_NAMES.get(got_type, f"unknown type {got_type}")
        raise HandshakeError(f"expected a handshake {what} (type {msg_type}), got {got}")
    if len(raw) != size:
        raise HandshakeError(f"handshake {what} must be {size} bytes, got {len(raw)}")
    return raw


def _parse_cipher(wire_id: int) -> Cipher:
    try:
        return Cipher(wire_id)
    except ValueError:
        allowed = ", ".join(f"{c.value} ({c.label})" for c in Cipher)
        raise HandshakeError(f"unknown cipher id {wire_id}; allowed: {allowed}") from None


@dataclass(frozen=True)
class ClientHello:
    """Message 1, client -> server: proposed cipher, client identity, ephemeral key, nonce."""

    cipher: Cipher
    client_identity: bytes
    client_ephemeral: bytes
    client_nonce: bytes

    def __post_init__(self) -> None:
        _require_size("client_identity", self.client_identity, PUBLIC_KEY_SIZE)
        _require_size("client_ephemeral", self.client_ephemeral, EPHEMERAL_SIZE)
        _require_size("client_nonce", self.client_nonce, NONCE_SIZE)

    def to_bytes(self) -> bytes:
        head = _PREFIX.pack(MAGIC, PROTOCOL_VERSION, MSG_HELLO) + bytes([self.cipher.value])
        return head + self.client_identity + self.client_ephemeral + self.client_nonce

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientHello:
        raw = _check_message(data, MSG_HELLO, HELLO_SIZE)
        body = raw[_PREFIX.size + 1 :]
        return cls(_parse_cipher(raw[_PREFIX.size]), body[:32], body[32:64], body[64:96])


@dataclass(frozen=True)
class ServerResponse:
    """Message 2, server -> client: cipher, server identity, ephemeral key, nonce, signature."""

    cipher: Cipher
    server_identity: bytes
    server_ephemeral: bytes
    server_nonce: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _require_size("server_identity", self.server_identity, PUBLIC_KEY_SIZE)
        _require_size("server_ephemeral", self.server_ephemeral, EPHEMERAL_SIZE)
        _require_size("server_nonce", self.server_nonce, NONCE_SIZE)
        _require_size("signature", self.signature, SIGNATURE_SIZE)

    def to_bytes(self) -> bytes:
        head = _PREFIX.pack(MAGIC, PROTOCOL_VERSION, MSG_RESPONSE) + bytes([self.cipher.value])
        return (
            head + self.server_identity + self.server_ephemeral + self.server_nonce + self.signature
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ServerResponse:
        raw = _check_message(data, MSG_RESPONSE, RESPONSE_SIZE)
        body = raw[_PREFIX.size + 1 :]
        return cls(_parse_cipher(raw[_PREFIX.size]), body[:32], body[32:64], body[64:96], body[96:])


@dataclass(frozen=True)
class ClientConfirm:
    """Message 3, client -> server: client signature of the transcript and key-confirmation MAC."""

    signature: bytes
    mac: bytes

    def __post_init__(self) -> None:
        _require_size("signature", self.signature, SIGNATURE_SIZE)
        _require_size("mac", self.mac, MAC_SIZE)

    def to_bytes(self) -> bytes:
        return _PREFIX.pack(MAGIC, PROTOCOL_VERSION, MSG_CONFIRM) + self.signature + self.mac

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientConfirm:
        raw = _check_message(data, MSG_CONFIRM, CONFIRM_SIZE)
        body = raw[_PREFIX.size :]
        return cls(body[:SIGNATURE_SIZE], body[SIGNATURE_SIZE:])


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _exchange(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519; a low-order peer key (all-zero shared secret) is a handshake failure."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise HandshakeError("peer ephemeral key is invalid (low-order X25519 point)") from None
    if not any(shared):
        raise HandshakeError("peer ephemeral key is invalid (all-zero X25519 shared secret)")
    return shared


def _check_context(context: object) -> bytes:
    if not isinstance(context, bytes):
        raise TypeError(f"context must be bytes, got {type(context).__name__}")
    return context


class ClientHandshake:
    """The silo's side: ``hello()``, then ``finish(response) -> (SessionKeys, confirm bytes)``."""

    def __init__(
        self,
        identity: IdentityKey,
        server_public: PublicIdentity,
        *,
        cipher: Cipher = Cipher.AES_256_GCM,
        context: bytes = b"",
    ) -> None:
        if not isinstance(identity, IdentityKey):
            raise TypeError(f"identity must be an IdentityKey, got {type(identity).__name__}")
        if not isinstance(server_public, PublicIdentity):
            raise TypeError(
                f"server_public must be a PublicIdentity, got {type(server_public).__name__}"
            )
        if not isinstance(cipher, Cipher):
            raise TypeError(f"cipher must be a Cipher, got {type(cipher).__name__}")
        self._identity = identity
        self._server_public = server_public
        self._cipher = cipher
        self._context = _check_context(context)
        self._ephemeral: X25519PrivateKey | None = None
        self._hello: ClientHello | None = None
        self._state = "new"

    def hello(self) -> bytes:
        """Message 1; may be called once."""
        if self._state != "new":
            raise HandshakeError(f"hello() was already called (handshake state: {self._state})")
        self._state = "hello-sent"
        self._ephemeral = X25519PrivateKey.generate()
        self._hello = ClientHello(
            self._cipher,
            self._identity.public_bytes(),
            _raw_public(self._ephemeral),
            os.urandom(NONCE_SIZE),
        )
        return self._hello.to_bytes()

    def finish(self, response: bytes) -> tuple[SessionKeys, bytes]:
        """Check the server's response; return the session keys and message 3 to send."""
        if self._state != "hello-sent" or self._hello is None or self._ephemeral is None:
            raise HandshakeError(f"finish() needs hello() first (handshake state: {self._state})")
        ephemeral, hello = self._ephemeral, self._hello
        self._state, self._ephemeral = "finished", None  # single use, success or not
        message = ServerResponse.from_bytes(response)
        if message.cipher is not hello.cipher:
            raise HandshakeError(
                f"server answered with cipher {message.cipher.label}, "
                f"client proposed {hello.cipher.label}"
            )
        if not hmac.compare_digest(message.server_identity, self._server_public.public_bytes()):
            raise UnknownIdentityError(
                f"server identity {fingerprint(message.server_identity)} does not match the "
                f"pinned server key {self._server_public.fingerprint()}"
            )
        transcript = transcript_hash(
            cipher=hello.cipher,
            context=self._context,
            client_identity=hello.client_identity,
            client_ephemeral=hello.client_ephemeral,
            client_nonce=hello.client_nonce,
            server_identity=message.server_identity,
            server_ephemeral=message.server_ephemeral,
            server_nonce=message.server_nonce,
        )
        try:
            self._server_public.verify(message.signature, _signed_message(Role.SERVER, transcript))
        except AuthenticationError:
            raise HandshakeError(
                f"server signature does not verify under pinned key "
                f"{self._server_public.fingerprint()} (tampered handshake, or the two sides use "
                "different contexts)"
            ) from None
        secrets = key_schedule(_exchange(ephemeral, message.server_ephemeral), transcript)
        confirm = ClientConfirm(
            self._identity.sign(_signed_message(Role.CLIENT, transcript)),
            _confirm_mac(secrets.confirm_key, transcript),
        )
        keys = SessionKeys(
            session_id=secrets.session_id,
            client_to_server=secrets.client_to_server,
            server_to_client=secrets.server_to_client,
            cipher=hello.cipher,
            client_identity=self._identity.public,
            server_identity=self._server_public,
        )
        return keys, confirm.to_bytes()


class ServerHandshake:
    """The coordinator's or enclave's side: ``respond(hello) -> bytes``, ``finish(confirm)``.

    One object per incoming connection; the enrollment can be shared between them.
    """

    def __init__(
        self,
        identity: IdentityKey,
        enrollment: Enrollment,
        *,
        ciphers: tuple[Cipher, ...] = (Cipher.AES_256_GCM, Cipher.CHACHA20_POLY1305),
        context: bytes = b"",
    ) -> None:
        if not isinstance(identity, IdentityKey):
            raise TypeError(f"identity must be an IdentityKey, got {type(identity).__name__}")
        if not isinstance(enrollment, Enrollment):
            raise TypeError(f"enrollment must be an Enrollment, got {type(enrollment).__name__}")
        ciphers = tuple(ciphers)
        if not ciphers or not all(isinstance(c, Cipher) for c in ciphers):
            raise ValueError(f"ciphers must be a non-empty tuple of Cipher, got {ciphers!r}")
        self._identity = identity
        self._enrollment = enrollment
        self._ciphers = ciphers
        self._context = _check_context(context)
        # after respond(): (cipher, enrolled client identity and name, transcript hash, secrets)
        self._pending: tuple[Cipher, PublicIdentity, str, bytes, HandshakeSecrets] | None = None
        self._state = "new"

    def respond(self, hello: bytes) -> bytes:
        """Check message 1 (version, cipher, enrollment) and return message 2; call it once."""
        if self._state != "new":
            raise HandshakeError(f"respond() was already called (handshake state: {self._state})")
        self._state = "failed"  # until the response is built
        message = ClientHello.from_bytes(hello)
        if message.cipher not in self._ciphers:
            allowed = ", ".join(c.label for c in self._ciphers)
            raise HandshakeError(
                f"client proposed cipher {message.cipher.label}; this server allows {allowed}"
            )
        client_name = self._enrollment.name_of(message.client_identity)
        ephemeral = X25519PrivateKey.generate()
        shared = _exchange(ephemeral, message.client_ephemeral)
        server_ephemeral, server_nonce = _raw_public(ephemeral), os.urandom(NONCE_SIZE)
        transcript = transcript_hash(
            cipher=message.cipher,
            context=self._context,
            client_identity=message.client_identity,
            client_ephemeral=message.client_ephemeral,
            client_nonce=message.client_nonce,
            server_identity=self._identity.public_bytes(),
            server_ephemeral=server_ephemeral,
            server_nonce=server_nonce,
        )
        response = ServerResponse(
            message.cipher,
            self._identity.public_bytes(),
            server_ephemeral,
            server_nonce,
            self._identity.sign(_signed_message(Role.SERVER, transcript)),
        )
        self._pending = (
            message.cipher,
            self._enrollment.get(client_name),
            client_name,
            transcript,
            key_schedule(shared, transcript),
        )
        self._state = "responded"
        return response.to_bytes()

    def finish(self, confirm: bytes) -> SessionKeys:
        """Check message 3 (client signature, key confirmation) and return the session keys."""
        if self._state != "responded" or self._pending is None:
            raise HandshakeError(f"finish() needs respond() first (handshake state: {self._state})")
        cipher, client_public, client_name, transcript, secrets = self._pending
        self._state, self._pending = "finished", None  # single use, success or not
        message = ClientConfirm.from_bytes(confirm)
        try:
            client_public.verify(message.signature, _signed_message(Role.CLIENT, transcript))
        except AuthenticationError:
            raise HandshakeError(
                f"signature of silo {client_name!r} ({client_public.fingerprint()}) does not "
                "verify (tampered handshake, or the two sides use different contexts)"
            ) from None
        if not hmac.compare_digest(message.mac, _confirm_mac(secrets.confirm_key, transcript)):
            raise HandshakeError(
                f"key confirmation from silo {client_name!r} failed: it derived different keys"
            )
        return SessionKeys(
            session_id=secrets.session_id,
            client_to_server=secrets.client_to_server,
            server_to_client=secrets.server_to_client,
            cipher=cipher,
            client_identity=client_public,
            server_identity=self._identity.public,
            client_name=client_name,
        )
