"""Exceptions raised by silotune.crypto; a failed check always raises, never returns False."""


class CryptoError(Exception):
    """Base class of every cryptographic failure in silotune."""


class AuthenticationError(CryptoError):
    """A frame, message or signature failed authentication (tampered or wrong key)."""


class ReplayError(CryptoError):
    """A frame carries a sequence number that was already accepted."""


class OrderError(CryptoError):
    """A frame arrived out of order (a sequence number was skipped)."""


class TruncationError(CryptoError):
    """A frame or stream is shorter than its header says."""


class HandshakeError(CryptoError):
    """The key-agreement handshake failed (bad transcript, bad signature, wrong version)."""


class UnknownIdentityError(HandshakeError):
    """The peer's identity key is not enrolled (or does not match the pinned key)."""


class KeyMaterialError(CryptoError):
    """Key material is malformed, of the wrong size, or of the wrong kind."""
