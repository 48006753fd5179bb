"""An authenticated, encrypted frame session between a silo and the trunk over any byte connection.

A session starts with the ``silotune.crypto`` handshake (the silo proves an enrolled Ed25519
identity, the coordinator proves the pinned one) and then carries split-learning frames
(:mod:`silotune.transport.frames`), each sealed by a :class:`~silotune.crypto.channel.SecureChannel`.
No frame is sent or accepted before the handshake has finished; every received frame is opened
(authenticated, in order, not replayed) before it is decoded, and decoded before it is used.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from silotune.crypto.channel import OVERHEAD, SecureChannel
from silotune.crypto.exceptions import CryptoError
from silotune.crypto.handshake import ClientHandshake, ServerHandshake
from silotune.crypto.identity import Enrollment, IdentityKey, PublicIdentity
from silotune.errors import SplitError
from silotune.transport.base import Connection, TransportError
from silotune.transport.frames import (
    KIND_ERROR,
    Frame,
    FrameError,
    FrameLimits,
    decode_frame,
    encode_frame,
)

__all__ = [
    "HANDSHAKE_CONTEXT",
    "FrameSession",
    "SplitError",
    "WireStats",
    "accept_session",
    "open_session",
]

log = logging.getLogger(__name__)

HANDSHAKE_CONTEXT = b"silotune/split/v1"  # both sides must use it; binds the keys to this protocol
MAX_FRAME_BYTES = 256 * 2**20
TENSORS_PER_FRAME = 48  # adapter states travel in several frames, each well inside the limits
MAX_STATE_FRAMES = 1024


@dataclass
class WireStats:
    """Bytes and frames this side sent and received on the wire (sealed AEAD frames)."""

    sent_bytes: int = 0
    received_bytes: int = 0
    sent_frames: int = 0
    received_frames: int = 0

    @property
    def total_bytes(self) -> int:
        """Bytes in both directions."""
        return self.sent_bytes + self.received_bytes


class FrameSession:
    """Seal-then-send and receive-then-open split frames over one connection.

    Parameters
    ----------
    connection
        The byte connection (in-process or gRPC) the handshake ran over.
    channel
        The session's AEAD channel.
    peer_name
        The peer's enrolled name (silo name on the coordinator, ``"coordinator"`` on a silo).
    limits
        Bounds checked on every received frame before any tensor is allocated.
    """

    def __init__(
        self,
        connection: Connection,
        channel: SecureChannel,
        peer_name: str,
        limits: FrameLimits | None = None,
    ) -> None:
        self.connection = connection
        self.channel = channel
        self.peer_name = peer_name
        self.limits = limits or FrameLimits(max_frame_bytes=MAX_FRAME_BYTES)
        self.stats = WireStats()
        self._send_lock = threading.Lock()

    def send(
        self,
        kind: str,
        step: int,
        tensors: Mapping[str, torch.Tensor] | None = None,
        meta: Mapping[str, Any] | None = None,
        *,
        silo_id: str = "",
        activation_dtype: str | None = None,
        data: bytes = b"",
    ) -> int:
        """Encode, seal and send one frame; returns the bytes put on the wire."""
        plain = encode_frame(
            kind,
            step,
            tensors or {},
            meta,
            silo_id=silo_id,
            activation_dtype=activation_dtype,
            data=data,
        )
        with self._send_lock:  # the channel is not thread-safe; sequence numbers must stay in order
            sealed = self.channel.seal(plain)
            self.connection.send(sealed)
            self.stats.sent_bytes += len(sealed)
            self.stats.sent_frames += 1
        return len(sealed)

    def recv(self, timeout: float | None = None) -> Frame:
        """Receive, open and decode the next frame.

        Raises
        ------
        CryptoError
            If the frame fails authentication, is replayed or out of order (the channel state is
            unchanged, so the caller decides whether the session goes on).
        FrameError
            If the opened frame is malformed or breaks the limits.
        SplitError
            If the peer sent an ``error`` frame (its message is in the error).
        ConnectionClosed, TransportTimeout
            From the transport.
        """
        sealed = self.connection.recv(timeout)
        self.stats.received_bytes += len(sealed)
        self.stats.received_frames += 1
        frame = decode_frame(self.channel.open(sealed), self.limits)
        if frame.kind == KIND_ERROR:
            message = frame.meta.get("message", "no reason given")
            raise SplitError(f"{self.peer_name} gave up: {message}")
        return frame

    def send_state(
        self,
        kind: str,
        step: int,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Send a named tensor state (an adapter) as ``parts`` frames of at most 48 tensors."""
        names = sorted(tensors)
        groups = [names[i : i + TENSORS_PER_FRAME] for i in range(0, len(names), TENSORS_PER_FRAME)]
        groups = groups or [[]]
        for index, group in enumerate(groups):
            part_meta = {**(meta or {}), "part": index, "parts": len(groups)}
            self.send(kind, step, {name: tensors[name] for name in group}, part_meta)

    def recv_state(self, first: Frame, timeout: float | None = None) -> dict[str, torch.Tensor]:
        """Collect a state sent with :meth:`send_state` whose first frame is ``first``."""
        parts = first.meta.get("parts")
        if (
            first.meta.get("part") != 0
            or isinstance(parts, bool)
            or not isinstance(parts, int)
            or not 1 <= parts <= MAX_STATE_FRAMES
        ):
            raise FrameError(
                f"a '{first.kind}' state must start with part 0 of 1..{MAX_STATE_FRAMES} parts"
            )
        state = dict(first.tensors)
        for index in range(1, parts):
            frame = self.recv(timeout)
            if frame.kind != first.kind or frame.meta.get("part") != index:
                raise FrameError(
                    f"expected part {index} of a '{first.kind}' state, got a '{frame.kind}' frame"
                )
            if state.keys() & frame.tensors.keys():
                raise FrameError(f"part {index} of a '{first.kind}' state repeats tensors")
            state.update(frame.tensors)
        return state

    def send_error(self, message: str) -> None:
        """Tell the peer why this side gives up; never raises (the peer may be gone)."""
        try:
            self.send(KIND_ERROR, 0, meta={"message": message[:2000]})
        except (TransportError, CryptoError, ValueError):
            log.debug("Could not send an error frame to %s.", self.peer_name)

    def last_words(self, timeout: float = 1.0) -> str | None:
        """The message of an ``error`` frame the peer sent before the connection ended, if any.

        Called after a transport error, so that the silo reports why the coordinator gave up
        instead of only that the connection closed.
        """
        for _ in range(8):  # a few frames may still be queued before the error frame
            try:
                self.recv(timeout)
            except SplitError as exc:
                return str(exc)
            except (TransportError, CryptoError, FrameError):
                return None
        return None

    def close(self) -> None:
        """Close the underlying connection."""
        self.connection.close()


def _channel_limit() -> int:
    return MAX_FRAME_BYTES + OVERHEAD


def open_session(
    connection: Connection,
    identity: IdentityKey,
    coordinator: PublicIdentity,
    timeout: float = 30.0,
) -> FrameSession:
    """Run the silo's side of the handshake and return the session.

    Parameters
    ----------
    connection
        A fresh connection to the trunk server.
    identity
        The silo's Ed25519 identity key (enrolled at the coordinator).
    coordinator
        The coordinator's pinned public identity.
    timeout
        Seconds to wait for the coordinator's answer.

    Raises
    ------
    SplitError
        If the coordinator refuses the silo, is not the pinned one, or does not answer.
    """
    handshake = ClientHandshake(identity, coordinator, context=HANDSHAKE_CONTEXT)
    try:
        connection.send(handshake.hello())
        response = connection.recv(timeout)
        keys, confirm = handshake.finish(response)
        connection.send(confirm)
    except CryptoError as exc:
        connection.close()
        raise SplitError(f"handshake with the coordinator failed: {exc}") from None
    except TransportError as exc:
        connection.close()
        raise SplitError(
            f"the coordinator closed the connection during the handshake ({exc}); is this silo's "
            "public key in the coordinator's enrollment?"
        ) from None
    channel = SecureChannel(keys, "client", max_frame_size=_channel_limit())
    return FrameSession(connection, channel, "coordinator")


def accept_session(
    connection: Connection,
    identity: IdentityKey,
    enrollment: Enrollment,
    timeout: float = 30.0,
) -> FrameSession:
    """Run the coordinator's side of the handshake; only enrolled silos get a session.

    Raises
    ------
    SplitError
        If the silo is not enrolled, its signature or key confirmation fails, or it is silent.
    """
    handshake = ServerHandshake(identity, enrollment, context=HANDSHAKE_CONTEXT)
    try:
        hello = connection.recv(timeout)
        connection.send(handshake.respond(hello))
        keys = handshake.finish(connection.recv(timeout))
    except CryptoError as exc:
        raise SplitError(f"refused a silo from {connection.peer}: {exc}") from None
    except TransportError as exc:
        raise SplitError(
            f"a silo from {connection.peer} left during the handshake ({exc})"
        ) from None
    channel = SecureChannel(keys, "server", max_frame_size=_channel_limit())
    return FrameSession(connection, channel, keys.client_name or "unnamed silo")
