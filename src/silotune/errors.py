"""Every exception silotune raises, rooted at :class:`SilotuneError`, in one module.

The CLI catches ``SilotuneError`` and prints its message as one line, so anything raised here
reaches a user without a traceback. Packages re-export the classes of their area (for example
``silotune.crypto.exceptions``), so callers can keep importing them from there.
"""

from __future__ import annotations


class SilotuneError(Exception):
    """An error a user can act on (config, data, checkpoint, command line, protocol, peer)."""


# ------------------------------------------------------------------ user input


class ConfigError(SilotuneError):
    """The job configuration is invalid; the message names the field path and allowed values."""


class DataError(SilotuneError):
    """A data file or dataset name is missing or malformed."""


class CheckpointError(SilotuneError):
    """A checkpoint is missing, incomplete or corrupt."""


class ModelError(SilotuneError):
    """A model name, folder or preset cannot be loaded."""


class TrainingError(SilotuneError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""


# ------------------------------------------------------------------ cryptography (crypto/)


class CryptoError(SilotuneError):
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


# ------------------------------------------------------------------ transport/


class TransportError(SilotuneError):
    """A transport failed: it could not connect, or the peer broke the transport protocol."""


class ConnectionClosed(TransportError):
    """The connection is closed (by either side, or because the peer vanished)."""


class TransportTimeout(TransportError, TimeoutError):
    """``recv`` waited for its whole timeout without a message; the connection stays usable."""


class MessageTooLarge(TransportError, ValueError):
    """A message exceeds the connection's maximum message size."""


class TlsMaterialError(SilotuneError):
    """TLS files are missing, unreadable, malformed or do not belong together."""


class RunFolderError(SilotuneError):
    """A folder given as a run's output is not one, or a file in it is unreadable."""


class FrameError(SilotuneError, ValueError):
    """A received frame is malformed, oversized or disagrees with its own header."""


# ------------------------------------------------------------------ secure aggregation (secagg/)


class MessageError(CryptoError):
    """A secure-aggregation message is malformed; the text names the message and the field."""


class ProtocolViolation(AuthenticationError):
    """Another party deviated from the protocol and this silo detected it; the round aborts."""


class PolicyError(SilotuneError):
    """The coordinator asked a silo for less protection than its own config demands."""


class RoundFailed(SilotuneError):
    """Too few silos remain at a stage of a secure-aggregation round (or the sum fails a check)."""


# ------------------------------------------------------------------ modes


class FederationError(SilotuneError):
    """A federated round cannot go on (too few silos, a bad message, a failed check)."""


class SplitError(SilotuneError):
    """A split session or job cannot go on; the message says why."""


# ------------------------------------------------------------------ enclaves


class AttestationError(SilotuneError):
    """A quote was refused: bad signature, measurement not allow-listed, stale nonce, bad format."""


class EnclaveError(SilotuneError):
    """An enclave could not start, or its code failed while serving a call."""


class SealingError(SilotuneError):
    """A sealed blob does not open here: another enclave, another platform, or tampered."""


class TamperedResultError(SilotuneError):
    """The REE answered an outsourced matmul with something other than the product."""


class MaskReuseError(SilotuneError, RuntimeError):
    """Keystream below the stream's counter was asked for: that would reuse a one-time mask."""
