"""In-process transport: connected endpoint pairs over queues, and a server that hands out pairs.

Used by tests and by single-process simulations of split learning; it behaves like the gRPC
transport (ordered whole messages, ConnectionClosed after either side closes) without sockets.
"""

from __future__ import annotations

import threading
from types import TracebackType

from silotune.transport.base import (
    ConnectionClosed,
    ConnectionHandler,
    HandlerThreads,
    Inbox,
    MessageTooLarge,
    TransportError,
    as_message,
)

__all__ = ["InProcessConnection", "InProcessServer", "inprocess_pair"]


class _PairState:
    """State shared by both endpoints of one pair."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed = False


class InProcessConnection:
    """One endpoint of an in-process pair; implements :class:`~silotune.transport.base.Connection`.

    Messages sent before the peer closes are still delivered; after them ``recv`` raises
    ConnectionClosed. Closing this endpoint makes its own ``recv`` and ``send`` raise at once.
    """

    def __init__(
        self, inbox: Inbox, outbox: Inbox, state: _PairState, peer: str, max_message_bytes: int
    ) -> None:
        self._inbox = inbox
        self._outbox = outbox  # the peer's inbox
        self._state = state
        self._peer = peer
        self._max = max_message_bytes

    @property
    def peer(self) -> str:
        """Name of the other endpoint."""
        return self._peer

    @property
    def closed(self) -> bool:
        """Whether either side has closed the pair."""
        return self._state.closed

    def send(self, data: bytes) -> None:
        """Deliver one message to the peer's inbox.

        Raises
        ------
        ConnectionClosed
            If the pair is closed.
        MessageTooLarge
            If ``data`` is longer than the maximum message size.
        """
        message = as_message(data)
        if len(message) > self._max:
            raise MessageTooLarge(
                f"Message of {len(message)} bytes exceeds the maximum of {self._max} bytes."
            )
        with self._state.lock:
            if self._state.closed or not self._outbox.put(message):
                raise ConnectionClosed(f"Connection to {self._peer} is closed.")

    def recv(self, timeout: float | None = None) -> bytes:
        """Return the next message from the peer.

        Raises
        ------
        ConnectionClosed
            If this endpoint was closed, or the peer closed and every earlier message was read.
        TransportTimeout
            If no message arrived within ``timeout`` seconds.
        """
        return self._inbox.get(timeout, sender=self._peer)

    def close(self) -> None:
        """Close both directions; idempotent."""
        with self._state.lock:
            self._state.closed = True
            self._inbox.close(f"Connection to {self._peer} was closed locally.", discard=True)
            self._outbox.close("The peer closed the connection.")

    def __enter__(self) -> InProcessConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def inprocess_pair(
    names: tuple[str, str] = ("a", "b"), max_message_bytes: int = 2**30
) -> tuple[InProcessConnection, InProcessConnection]:
    """Return two connected endpoints; what one sends, the other receives.

    Parameters
    ----------
    names
        Names of the two endpoints (each endpoint's ``peer`` is the other's name).
    max_message_bytes
        Largest message either side may send.
    """
    if max_message_bytes < 1:
        raise ValueError(f"max_message_bytes must be >= 1, got {max_message_bytes}.")
    state = _PairState()
    a_inbox, b_inbox = Inbox(), Inbox()
    a = InProcessConnection(a_inbox, b_inbox, state, names[1], max_message_bytes)
    b = InProcessConnection(b_inbox, a_inbox, state, names[0], max_message_bytes)
    return a, b


class InProcessServer:
    """Hands each :meth:`connect` call's server end to ``handler`` in its own thread.

    Parameters
    ----------
    handler
        Called once per connection with the server-side endpoint; the endpoint is closed when it
        returns.
    max_message_bytes
        Largest message either side may send.
    """

    def __init__(self, handler: ConnectionHandler, max_message_bytes: int = 2**30) -> None:
        self._threads = HandlerThreads(handler, "inprocess")
        self._max = max_message_bytes
        self._lock = threading.Lock()
        self._running = False
        self._stopped = False
        self._server_ends: list[InProcessConnection] = []

    def start(self) -> None:
        """Start accepting connections."""
        with self._lock:
            if self._stopped:
                raise TransportError("A stopped InProcessServer cannot be started again.")
            self._running = True

    def connect(self, client_id: str = "client") -> InProcessConnection:
        """Open a connection; returns the client end and starts the handler on the server end.

        Raises
        ------
        TransportError
            If the server is not running.
        """
        with self._lock:
            if not self._running:
                raise TransportError("InProcessServer is not running; call start() first.")
            server_end, client_end = inprocess_pair(("server", client_id), self._max)
            self._server_ends = [end for end in self._server_ends if not end.closed]
            self._server_ends.append(server_end)
        self._threads.spawn(server_end)
        return client_end

    @property
    def active_connections(self) -> int:
        """Number of handlers still running."""
        return self._threads.active

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting; after ``grace`` seconds close every live connection and join handlers."""
        with self._lock:
            self._running = False
            self._stopped = True
            ends = list(self._server_ends)
            self._server_ends.clear()
        if grace:
            self._threads.join(grace)
        for end in ends:
            end.close()
        self._threads.join(5.0)

    def __enter__(self) -> InProcessServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
