"""The byte-message connection Protocol every transport implements, its errors, and handler threads.

A connection carries whole messages (``bytes`` in, the same ``bytes`` out, in order) in both
directions. Messages are opaque: encryption (``silotune.crypto``) and framing
(``silotune.transport.frames``) sit on top, so a transport never interprets what it carries.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from silotune.errors import ConnectionClosed, MessageTooLarge, TransportError, TransportTimeout

__all__ = [
    "Connection",
    "ConnectionClosed",
    "ConnectionHandler",
    "ConnectionServer",
    "HandlerThreads",
    "Inbox",
    "MessageTooLarge",
    "TransportError",
    "TransportTimeout",
    "as_message",
]

log = logging.getLogger(__name__)


@runtime_checkable
class Connection(Protocol):
    """A bidirectional, ordered, message-oriented byte connection."""

    @property
    def peer(self) -> str:
        """A human-readable description of the other end, for logs (never for authentication)."""
        ...

    def send(self, data: bytes) -> None:
        """Send one message; blocks while the transport applies back-pressure.

        Raises
        ------
        ConnectionClosed
            If the connection is closed.
        MessageTooLarge
            If ``data`` exceeds the maximum message size.
        """
        ...

    def recv(self, timeout: float | None = None) -> bytes:
        """Return the next message, waiting at most ``timeout`` seconds (``None``: forever).

        Raises
        ------
        ConnectionClosed
            If the connection is closed and no message is left.
        TransportTimeout
            If no message arrived in time.
        """
        ...

    def close(self) -> None:
        """Close the connection; idempotent. The peer's ``recv`` then raises ConnectionClosed."""
        ...


ConnectionHandler = Callable[[Connection], None]
"""Server-side callback run once per accepted connection, in its own thread."""


class ConnectionServer(Protocol):
    """Accepts connections and runs a :data:`ConnectionHandler` for each in its own thread."""

    def start(self) -> None:
        """Start accepting connections."""
        ...

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, close live connections after ``grace`` seconds, join handler threads."""
        ...


def as_message(data: object) -> bytes:
    """Return ``data`` as immutable bytes, copying buffers so later edits by the caller go unseen.

    Raises
    ------
    TypeError
        If ``data`` is not bytes, bytearray or memoryview.
    """
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"Transports send bytes, bytearray or memoryview, got {type(data).__name__}.")


class HandlerThreads:
    """Runs one handler per connection in a daemon thread; closes it afterwards; joins on stop.

    A handler that raises is logged and its connection closed; other connections are unaffected.
    A handler that raises ConnectionClosed is normal (the peer left) and logged at DEBUG.
    """

    def __init__(self, handler: ConnectionHandler, name: str) -> None:
        self._handler = handler
        self._name = name
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._count = 0

    def spawn(self, connection: Connection) -> threading.Thread:
        """Start the handler for ``connection`` in a new thread and return the thread."""
        with self._lock:
            self._count += 1
            thread = threading.Thread(
                target=self._run,
                args=(connection,),
                name=f"{self._name}-conn-{self._count}",
                daemon=True,
            )
            self._threads.add(thread)
        thread.start()
        return thread

    def _run(self, connection: Connection) -> None:
        try:
            self._handler(connection)
        except ConnectionClosed:
            log.debug("Connection from %s closed while its handler ran.", connection.peer)
        except Exception:
            log.exception("Handler for connection from %s failed.", connection.peer)
        finally:
            connection.close()
            with self._lock:
                self._threads.discard(threading.current_thread())

    @property
    def active(self) -> int:
        """Number of handler threads still running."""
        with self._lock:
            return len(self._threads)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every handler thread; return True if all finished within ``timeout`` seconds."""
        with self._lock:
            threads = list(self._threads)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        return not any(thread.is_alive() for thread in threads)


class Inbox:
    """Received messages not yet read, bounded in bytes; closing wakes every waiter.

    Parameters
    ----------
    max_bytes
        ``put`` waits while the queued messages hold more (a single message always fits), so a
        transport's reader stops reading and the network's flow control slows the sender.
        ``None``: unbounded.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self._cond = threading.Condition()
        self._items: collections.deque[bytes] = collections.deque()
        self._bytes = 0
        self._max = max_bytes
        self._closed_reason: str | None = None

    def put(self, message: bytes) -> bool:
        """Queue a message, waiting for room; return False if the inbox is closed."""
        with self._cond:
            while (
                self._max is not None
                and self._items
                and self._bytes + len(message) > self._max
                and self._closed_reason is None
            ):
                self._cond.wait()
            if self._closed_reason is not None:
                return False
            self._items.append(message)
            self._bytes += len(message)
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None, sender: str = "the peer") -> bytes:
        """Return the oldest message (still returned after a close without ``discard``).

        ``sender`` names the peer in the timeout error.

        Raises
        ------
        ConnectionClosed
            If the inbox is closed and empty; the message is the reason given to :meth:`close`.
        TransportTimeout
            If no message arrived within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self._closed_reason is not None:
                    raise ConnectionClosed(self._closed_reason)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TransportTimeout(f"No message from {sender} within {timeout} s.")
                self._cond.wait(remaining)
            message = self._items.popleft()
            self._bytes -= len(message)
            self._cond.notify_all()
            return message

    def close(self, reason: str, discard: bool = False) -> None:
        """Refuse new messages; ``discard`` also drops unread ones. The first reason sticks."""
        with self._cond:
            if self._closed_reason is None:
                self._closed_reason = reason
            if discard:
                self._items.clear()
                self._bytes = 0
            self._cond.notify_all()
