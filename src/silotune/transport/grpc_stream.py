"""gRPC transport: one bidirectional byte stream per connection, messages chunked at a few MiB.

There is no ``.proto``: the single method ``/silotune.transport.v1.ByteStream/Exchange`` uses
identity (bytes) serializers. Each gRPC message is one chunk::

    version u8 | message id u64 | chunk index u32 | flags u8 (bit 0: last chunk) | data

The receiver reassembles chunks (`transport.chunking`) into whole messages, refusing any message over its
``max_message_bytes`` and any out-of-order chunk. TLS is the default; plaintext needs
``insecure=True``. The client id travels as metadata for logging only: peers authenticate each
other with the ``silotune.crypto`` handshake carried over this stream, not with it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from types import TracebackType
from typing import Any, cast

import grpc

from silotune.transport.base import (
    ConnectionClosed,
    ConnectionHandler,
    HandlerThreads,
    Inbox,
    MessageTooLarge,
    TransportError,
    as_message,
)
from silotune.transport.chunking import Reassembler, iter_chunks
from silotune.transport.tls import TlsMaterial

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "METHOD",
    "GrpcConnection",
    "GrpcStreamServer",
    "Reassembler",
    "connect",
    "iter_chunks",
]

log = logging.getLogger(__name__)

SERVICE = "silotune.transport.v1.ByteStream"
METHOD = f"/{SERVICE}/Exchange"
CLIENT_ID_KEY = "silotune-client-id"  # invocation metadata: free-form client name, for logs
CHUNK_KEY = "silotune-max-chunk"  # both directions: largest chunk this side accepts
SERVER_KEY = "silotune-stream"  # initial metadata: proves the peer speaks this protocol

DEFAULT_CHUNK_BYTES = 2 * 2**20
DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20
MIN_CHUNK_BYTES = 1024

_GRPC_OVERHEAD = 1024  # gRPC length limits apply to chunks; leave room for the chunk header
_END = object()  # outbox sentinel: finish the outgoing stream after what is queued
_POLL = 0.05  # seconds between checks of the closed flags while a send is blocked
_IDLE_POLL = 0.5  # the same for an idle outgoing stream (closing also wakes it directly)


# --------------------------------------------------------------------------- connection


class GrpcConnection:
    """One end of a gRPC byte stream; implements :class:`~silotune.transport.base.Connection`.

    Built by :func:`connect` (client) or by :class:`GrpcStreamServer` (server); not directly.
    """

    def __init__(self, peer: str, chunk_bytes: int, max_message_bytes: int) -> None:
        self._peer = peer
        self._chunk = chunk_bytes
        self._max = max_message_bytes
        self._inbox = Inbox(max_message_bytes)
        self._outbox: queue.Queue[object] = queue.Queue(maxsize=4)
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._next_id = 0
        self._closed = False  # no more sends; set by close() or when the peer goes
        self._reason = "still open"
        self._aborted = threading.Event()  # the RPC is over: stop the outgoing stream now
        self._abort_status: tuple[grpc.StatusCode, str] | None = None
        self._cancel: Callable[[], None] = lambda: None
        self._server_side = False
        self._reader: threading.Thread | None = None
        self._reassembler = Reassembler(max_message_bytes)

    @property
    def peer(self) -> str:
        """Client id and address of the other end, for logs."""
        return self._peer

    @property
    def closed(self) -> bool:
        """Whether the connection is closed (locally or by the peer)."""
        return self._closed

    def send(self, data: bytes) -> None:
        """Send one message as one or more chunks; blocks under gRPC flow control.

        Raises
        ------
        ConnectionClosed
            If the connection is closed (before or while sending).
        MessageTooLarge
            If ``data`` exceeds the maximum message size.
        """
        message = as_message(data)
        if len(message) > self._max:
            raise MessageTooLarge(
                f"Message of {len(message)} bytes exceeds the maximum of {self._max} bytes."
            )
        with self._send_lock:
            if self._closed:
                raise ConnectionClosed(f"Connection to {self._peer} is closed: {self._reason}.")
            message_id = self._next_id
            self._next_id += 1
            for chunk in iter_chunks(message_id, message, self._chunk):
                while True:
                    if self._aborted.is_set():
                        raise ConnectionClosed(
                            f"Connection to {self._peer} closed while sending: {self._reason}."
                        )
                    try:
                        self._outbox.put(chunk, timeout=_POLL)
                        break
                    except queue.Full:
                        continue

    def recv(self, timeout: float | None = None) -> bytes:
        """Return the next whole message from the peer.

        Raises
        ------
        ConnectionClosed
            If this end was closed, or the peer closed and every earlier message was read.
        TransportTimeout
            If no message arrived within ``timeout`` seconds.
        """
        return self._inbox.get(timeout, sender=self._peer)

    def close(self, grace: float = 2.0) -> None:
        """Finish sending what is queued, end the stream, and stop; idempotent.

        Parameters
        ----------
        grace
            Seconds to wait for queued chunks to go out before the stream is cancelled.
        """
        # Wait for a send in progress so a message is not cut in half, but not forever.
        if self._send_lock.acquire(timeout=grace):
            try:
                with self._state_lock:
                    first = not self._closed
                    if first:
                        self._reason = "closed locally"
                    self._closed = True
                self._inbox.close(f"Connection to {self._peer} was closed locally.", discard=True)
                if first and not self._aborted.is_set():
                    try:
                        self._outbox.put(_END, timeout=grace)
                    except queue.Full:
                        self._abort("close() timed out flushing queued chunks")
            finally:
                self._send_lock.release()
        else:
            self._inbox.close(f"Connection to {self._peer} was closed locally.", discard=True)
            self._abort("close() interrupted a send that did not finish in time")
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(grace)
        if not self._aborted.is_set():
            self._abort("closed")
        self._after_close()

    def _after_close(self) -> None:
        """Hook for the client to release its channel."""

    def _abort(
        self, reason: str, status: tuple[grpc.StatusCode, str] | None = None, cancel: bool = True
    ) -> None:
        """End the connection now: the stream stops, recv raises once delivered messages are read.

        ``cancel`` cancels the RPC; without it the outgoing stream just ends (a clean finish).
        """
        with self._state_lock:
            if not self._closed:
                self._reason = reason
            self._closed = True
            if status is not None and self._abort_status is None:
                self._abort_status = status
            first = not self._aborted.is_set()
            self._aborted.set()
        self._inbox.close(f"Connection to {self._peer} closed: {reason}.", discard=False)
        if not first:
            return
        try:
            self._outbox.put_nowait(_END)  # wake the outgoing stream at once
        except queue.Full:
            pass  # it polls the aborted flag
        if cancel and not (status is not None and self._server_side):
            self._cancel()  # a server reports ``status`` through context.abort instead

    def _outgoing(self, context: grpc.ServicerContext | None = None) -> Iterator[bytes]:
        """Chunks for gRPC to send: the request stream (client) or response stream (server)."""
        while True:
            try:
                item = self._outbox.get(timeout=_IDLE_POLL)
            except queue.Empty:
                if self._aborted.is_set():
                    break
                continue
            if item is _END:
                break
            yield cast(bytes, item)
        if context is not None and self._abort_status is not None:
            context.abort(*self._abort_status)

    def _consume(self, incoming: Iterator[bytes]) -> None:
        """Reader thread: reassemble incoming chunks into the inbox until the stream ends."""
        try:
            for chunk in incoming:
                message = self._reassembler.feed(chunk)
                if message is not None and not self._inbox.put(message):
                    return
            reason, clean = "the peer ended the stream", True
        except TransportError as exc:
            log.warning("Dropping connection to %s: %s", self._peer, exc)
            self._abort(str(exc), (grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
            return
        except grpc.RpcError as exc:
            reason, clean = _describe(exc), False
        except Exception as exc:  # gRPC's server-side request iterator raises plain errors too
            reason, clean = f"the stream failed ({type(exc).__name__})", False
        if self._reassembler.partial:
            reason, clean = f"{reason} in the middle of a message", False
        log.debug("Connection to %s ended: %s.", self._peer, reason)
        self._abort(reason, cancel=not clean)  # a clean end finishes our side without cancelling

    def __enter__(self) -> GrpcConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _describe(exc: grpc.RpcError) -> str:
    code = getattr(exc, "code", lambda: None)()
    details = getattr(exc, "details", lambda: None)()
    if code is None:
        return str(exc) or type(exc).__name__
    return f"{code.name}: {details}" if details else code.name


def _limits(chunk_bytes: int) -> list[tuple[str, Any]]:
    size = chunk_bytes + _GRPC_OVERHEAD
    return [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)]


def _check_sizes(chunk_bytes: int, max_message_bytes: int) -> None:
    if not MIN_CHUNK_BYTES <= chunk_bytes <= 64 * 2**20:
        raise ValueError(
            f"chunk_bytes must be from {MIN_CHUNK_BYTES} to 64 MiB, got {chunk_bytes}."
        )
    if max_message_bytes < 1:
        raise ValueError(f"max_message_bytes must be >= 1, got {max_message_bytes}.")


def _peer_chunk(metadata: Any, own: int) -> int:
    """Chunk size to send: ours, capped by what the peer says it accepts."""
    for key, value in metadata or ():
        if key == CHUNK_KEY:
            try:
                return max(MIN_CHUNK_BYTES, min(own, int(value)))
            except (TypeError, ValueError):
                break
    return own


# --------------------------------------------------------------------------- server


class GrpcStreamServer:
    """Serves byte streams; each client stream is handed to ``handler`` in its own thread.

    Parameters
    ----------
    handler
        Called once per connection; the connection is closed when it returns. When the client
        vanishes, its ``recv``/``send`` raise ConnectionClosed; other connections are unaffected.
    address
        ``host:port`` to bind; port 0 picks a free port (see :attr:`port`).
    tls
        Server certificate and key (see :mod:`silotune.transport.tls`). Required unless
        ``insecure`` is true.
    insecure
        Serve plaintext; only for tests and trusted loopback.
    max_connections
        Concurrent streams; more are refused with RESOURCE_EXHAUSTED.
    chunk_bytes, max_message_bytes
        Chunk size (also the gRPC message limit) and largest reassembled message.
    """

    def __init__(
        self,
        handler: ConnectionHandler,
        address: str = "127.0.0.1:0",
        *,
        tls: TlsMaterial | None = None,
        insecure: bool = False,
        max_connections: int = 32,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        _check_sizes(chunk_bytes, max_message_bytes)
        if (tls is None) == (not insecure):
            raise ValueError(
                "GrpcStreamServer needs tls=TlsMaterial(...) or insecure=True, not both."
            )
        if tls is not None and (tls.server_cert_pem is None or tls.server_key_pem is None):
            raise ValueError("tls has no server certificate and key; load it with role='server'.")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}.")
        self._threads = HandlerThreads(handler, "grpc")
        self._chunk = chunk_bytes
        self._max = max_message_bytes
        self._address = address
        self._accepting = False
        self._lock = threading.Lock()
        self._connections: set[GrpcConnection] = set()
        options = [
            *_limits(chunk_bytes),
            ("grpc.keepalive_time_ms", 30_000),  # ping idle clients to notice dead ones
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        self._executor = futures.ThreadPoolExecutor(
            max_workers=max_connections + 2, thread_name_prefix="grpc-rpc"
        )
        self._server = grpc.server(
            self._executor,
            options=options,
            maximum_concurrent_rpcs=max_connections,
        )
        rpc = grpc.stream_stream_rpc_method_handler(self._exchange)  # bytes in, bytes out
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Exchange": rpc}),)
        )
        if tls is None:
            self._port: int = self._server.add_insecure_port(address)
        else:
            assert tls.server_key_pem is not None and tls.server_cert_pem is not None
            credentials = grpc.ssl_server_credentials([(tls.server_key_pem, tls.server_cert_pem)])
            self._port = self._server.add_secure_port(address, credentials)
        if self._port == 0:
            raise TransportError(f"Cannot bind gRPC server to {address}.")

    @property
    def port(self) -> int:
        """The bound port."""
        return self._port

    @property
    def target(self) -> str:
        """``host:port`` a client on the same host can connect to."""
        host = self._address.rsplit(":", 1)[0]
        host = "127.0.0.1" if host in ("", "0.0.0.0", "[::]") else host
        return f"{host}:{self._port}"

    @property
    def active_connections(self) -> int:
        """Number of handlers still running."""
        return self._threads.active

    def start(self) -> None:
        """Start serving."""
        self._accepting = True
        self._server.start()
        log.info("Serving byte streams on port %d.", self._port)

    def stop(self, grace: float | None = None) -> None:
        """Refuse new streams, wait ``grace`` seconds, cancel the rest and join their handlers."""
        self._accepting = False
        self._server.stop(grace).wait()
        with self._lock:
            live = list(self._connections)
        for connection in live:
            connection._abort("the server stopped")
        if not self._threads.join(5.0):
            log.warning("%d connection handlers did not finish.", self._threads.active)
        self._executor.shutdown(wait=False)

    def _exchange(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        if not self._accepting:
            context.abort(grpc.StatusCode.UNAVAILABLE, "The server is stopping.")
        metadata = context.invocation_metadata()
        client_id = next((str(v) for k, v in metadata or () if k == CLIENT_ID_KEY), "")
        peer = f"{client_id[:64]}@{context.peer()}" if client_id else context.peer()
        connection = GrpcConnection(peer, _peer_chunk(metadata, self._chunk), self._max)
        connection._cancel = context.cancel
        connection._server_side = True
        with self._lock:
            self._connections.add(connection)

        def done() -> None:
            midway = " in the middle of a message" if connection._reassembler.partial else ""
            connection._abort(f"the RPC ended{midway}", cancel=False)
            with self._lock:
                self._connections.discard(connection)

        if not context.add_callback(done):
            done()
            return iter(())
        context.send_initial_metadata(((SERVER_KEY, "1"), (CHUNK_KEY, str(self._chunk))))
        reader = threading.Thread(
            target=connection._consume, args=(request_iterator,), daemon=True, name="grpc-reader"
        )
        connection._reader = reader
        reader.start()
        self._threads.spawn(connection)
        log.debug("Accepted a stream from %s.", peer)
        return connection._outgoing(context)

    def __enter__(self) -> GrpcStreamServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(0)


# --------------------------------------------------------------------------- client


class _ClientConnection(GrpcConnection):
    def __init__(self, peer: str, chunk: int, max_message: int, channel: grpc.Channel) -> None:
        super().__init__(peer, chunk, max_message)
        self._channel = channel
        self.ready = threading.Event()
        self.server_metadata: tuple[tuple[str, Any], ...] | None = None

    def _run(self, call: Any) -> None:
        try:
            self.server_metadata = call.initial_metadata()
        except grpc.RpcError:
            self.server_metadata = None
        self.ready.set()
        self._consume(call)

    def _after_close(self) -> None:
        self._channel.close()


def connect(
    target: str,
    *,
    tls: TlsMaterial | None = None,
    insecure: bool = False,
    client_id: str = "",
    timeout: float = 10.0,
    server_name: str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> GrpcConnection:
    """Open one byte stream to a :class:`GrpcStreamServer`.

    Parameters
    ----------
    target
        ``host:port`` of the server.
    tls
        Material holding the CA certificate that signed the server's certificate. Required
        unless ``insecure`` is true.
    insecure
        Connect in plaintext; only for tests and trusted loopback.
    client_id
        Sent as metadata; shown in the server's logs. Not authentication.
    timeout
        Seconds to wait for the server to accept the stream.
    server_name
        Name to check the server certificate against when it differs from ``target``'s host.
    chunk_bytes, max_message_bytes
        Chunk size (also the gRPC message limit) and largest reassembled message.

    Returns
    -------
    GrpcConnection
        The open connection; close it (or use it as a context manager).

    Raises
    ------
    TransportError
        If the stream cannot be opened in time, naming the gRPC status (for example a TLS
        certificate that does not verify).
    """
    _check_sizes(chunk_bytes, max_message_bytes)
    if len(client_id) > 128 or not all(" " <= ch <= "~" for ch in client_id):
        raise ValueError(
            f"client_id must be at most 128 printable ASCII characters: {client_id!r}."
        )
    if (tls is None) == (not insecure):
        raise ValueError("connect() needs tls=TlsMaterial(...) or insecure=True, not both.")
    options = _limits(chunk_bytes)
    if tls is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=tls.ca_cert_pem)
        channel = grpc.secure_channel(target, credentials, options=options)

    peer = f"server@{target}"
    connection = _ClientConnection(peer, chunk_bytes, max_message_bytes, channel)
    stream = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
    metadata = ((CLIENT_ID_KEY, client_id), (CHUNK_KEY, str(chunk_bytes)))
    call = stream(connection._outgoing(), metadata=metadata)
    connection._cancel = call.cancel
    reader = threading.Thread(target=connection._run, args=(call,), daemon=True, name="grpc-reader")
    connection._reader = reader
    reader.start()

    if not connection.ready.wait(timeout):
        connection._abort("connect timed out")
        channel.close()
        raise TransportError(f"No answer from {target} within {timeout} s.")
    server_metadata = connection.server_metadata
    if not server_metadata or not any(key == SERVER_KEY for key, _ in server_metadata):
        reader.join(timeout)
        code = call.code() if call.done() else None
        detail = f"{code.name}: {call.details()}" if code is not None else "no protocol header"
        channel.close()
        hint = ""
        if "CERTIFICATE_VERIFY_FAILED" in detail or "handshake" in detail.lower():
            hint = " The server's TLS certificate does not verify against the given CA."
        raise TransportError(f"Cannot open a byte stream to {target} ({detail}).{hint}")
    connection._chunk = _peer_chunk(server_metadata, chunk_bytes)
    log.debug("Connected to %s.", target)
    return connection
