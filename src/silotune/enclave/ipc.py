"""The simulated enclave's process boundary: typed, length-prefixed messages over a Unix socket.

Each message is ``body_length (u32) | type (u8) | ident (u32) | body``. ``ident`` names a call (for
call, return, error and ocall messages) or a relayed connection (open, data, close). Call and ocall
bodies are :mod:`silotune.transport.frames` frames (JSON header + safetensors, never pickle); relayed
data is opaque bytes (a silo's sealed channel frames). Frames have no ``uint8`` dtype, so opaque
bytes inside a call (a sealed blob) travel in the frame's data section (:func:`encode_call`).
"""

from __future__ import annotations

import enum
import logging
import queue
import socket
import struct
import threading
from typing import Any

import torch

from silotune.enclave.base import EnclaveError, Tensors
from silotune.transport.base import ConnectionClosed, Inbox, TransportError, as_message
from silotune.transport.frames import (
    KIND_ERROR,
    KIND_FORWARD,
    FrameError,
    FrameLimits,
    decode_frame,
    encode_frame,
)

__all__ = [
    "ChannelConnection",
    "Endpoint",
    "IpcLink",
    "Msg",
    "decode_call",
    "decode_error",
    "encode_call",
    "encode_error",
    "take_bytes",
    "take_tensor",
]

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">IBI")
MAX_BODY = 2**31 - 1
IPC_LIMITS = FrameLimits(max_frame_bytes=MAX_BODY, max_tensors=4096, max_numel=2**31 - 1)


class Msg(enum.IntEnum):
    """Message types on the process boundary."""

    INIT = 1  # host -> enclave: app, config, platform key (JSON)
    READY = 2  # enclave -> host: measurement and identity (JSON)
    FAILED = 3  # enclave -> host: the app could not start (UTF-8 message)
    CALL = 4  # host -> enclave: a call frame
    RETURN = 5  # enclave -> host: the call's answer frame
    ERROR = 6  # enclave -> host: the call failed (error frame)
    OCALL = 7  # enclave -> host: a call back into the host during a call
    OCALL_RETURN = 8  # host -> enclave: the ocall's answer frame
    OCALL_ERROR = 9  # host -> enclave: the ocall failed (error frame)
    OPEN = 10  # host -> enclave: a relayed connection opened (body: peer description)
    DATA = 11  # both ways: one message of a relayed connection (opaque bytes)
    CLOSE = 12  # both ways: a relayed connection closed


class IpcLink:
    """Whole typed messages over a connected stream socket; ``send`` is thread-safe."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()

    def send(self, kind: Msg, ident: int, body: bytes = b"") -> None:
        """Send one message; raises ConnectionClosed when the other process is gone."""
        if len(body) > MAX_BODY:
            raise EnclaveError(f"a message to or from the enclave is at most {MAX_BODY} bytes")
        try:
            with self._send_lock:
                self._sock.sendall(_HEADER.pack(len(body), int(kind), ident))
                if body:
                    self._sock.sendall(body)
        except OSError as exc:
            raise ConnectionClosed(f"the enclave link is closed ({exc})") from None

    def recv(self) -> tuple[Msg, int, bytes]:
        """The next message; raises ConnectionClosed at end of stream or on a bad type."""
        length, kind, ident = _HEADER.unpack(self._read(_HEADER.size))
        try:
            msg = Msg(kind)
        except ValueError:
            raise ConnectionClosed(f"unknown message type {kind} on the enclave link") from None
        return msg, ident, self._read(length)

    def _read(self, size: int) -> bytes:
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        while got < size:
            try:
                n = self._sock.recv_into(view[got:])
            except OSError as exc:
                raise ConnectionClosed(f"the enclave link is closed ({exc})") from None
            if n == 0:
                raise ConnectionClosed("the other side of the enclave link exited")
            got += n
        return bytes(buffer)

    def settimeout(self, seconds: float | None) -> None:
        """Timeout of blocking reads (used only while an enclave starts)."""
        self._sock.settimeout(seconds)

    def close(self) -> None:
        """Close the socket; the other side's ``recv`` then raises ConnectionClosed."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def encode_call(method: str, meta: dict[str, Any], tensors: Tensors) -> bytes:
    """A call, ocall or answer as a frame: ``meta = {"method", "meta", "blobs"}`` plus values.

    Tensor values travel as tensors; bytes values (sealed blobs) travel in the frame's data
    section, named with their lengths in ``blobs``.
    """
    arrays = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    blobs = {k: bytes(v) for k, v in tensors.items() if not isinstance(v, torch.Tensor)}
    sizes = [[name, len(blob)] for name, blob in blobs.items()]
    header = {"method": method, "meta": meta, "blobs": sizes}
    return encode_frame(KIND_FORWARD, 0, arrays, header, data=b"".join(blobs.values()))


def decode_call(body: bytes) -> tuple[str, dict[str, Any], Tensors]:
    """Inverse of :func:`encode_call`; raises FrameError on anything malformed."""
    frame = decode_frame(body, IPC_LIMITS)
    method, meta = frame.meta.get("method"), frame.meta.get("meta")
    if frame.kind != KIND_FORWARD or not isinstance(method, str) or not isinstance(meta, dict):
        raise FrameError("an enclave call frame carries meta {'method': str, 'meta': dict}")
    values: Tensors = dict(frame.tensors)
    sizes, offset = frame.meta.get("blobs"), 0
    if not isinstance(sizes, list):
        raise FrameError("an enclave call frame lists its blobs as [name, length] pairs")
    for entry in sizes:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not isinstance(entry[0], str)
            or entry[0] in values
            or isinstance(entry[1], bool)
            or not isinstance(entry[1], int)
            or entry[1] < 0
        ):
            raise FrameError("an enclave call frame lists its blobs as [name, length] pairs")
        values[entry[0]] = frame.data[offset : offset + entry[1]]
        offset += entry[1]
    if offset != len(frame.data):
        raise FrameError("an enclave call frame's blobs do not add up to its data section")
    return method, meta, values


def take_bytes(values: Tensors, name: str) -> bytes:
    """The opaque bytes value ``name`` of a call; EnclaveError if it is missing or a tensor."""
    value = values.get(name)
    if not isinstance(value, bytes):
        raise EnclaveError(f"an enclave call needs the bytes value {name!r}")
    return value


def take_tensor(values: Tensors, name: str) -> torch.Tensor:
    """The tensor value ``name`` of a call; EnclaveError if it is missing or bytes."""
    value = values.get(name)
    if not isinstance(value, torch.Tensor):
        raise EnclaveError(f"an enclave call needs the tensor {name!r}")
    return value


def encode_error(message: str) -> bytes:
    """An error answer carrying one message."""
    return encode_frame(KIND_ERROR, 0, {}, {"message": message[:4000]})


def decode_error(body: bytes) -> str:
    """The message of an :func:`encode_error` frame (or a note that it was malformed)."""
    try:
        message = decode_frame(body, IPC_LIMITS).meta.get("message")
    except FrameError as exc:
        return f"(malformed error answer: {exc})"
    return message if isinstance(message, str) else "(no message)"


class ChannelConnection:
    """One relayed connection over the link; implements :class:`~silotune.transport.base.Connection`.

    The same class serves both processes: the host feeds it the enclave's data and the enclave
    feeds it the host's.
    """

    def __init__(self, link: IpcLink, ident: int, peer: str, on_close: Any = None) -> None:
        self._link = link
        self._ident = ident
        self._peer = peer
        self._inbox = Inbox()
        self._closed = False
        self._lock = threading.Lock()
        self._on_close = on_close

    @property
    def peer(self) -> str:
        """Who is at the other end, for logs."""
        return self._peer

    def feed(self, data: bytes) -> None:
        """Deliver a message that arrived on the link."""
        self._inbox.put(data)

    def feed_close(self) -> None:
        """The other side closed this connection."""
        with self._lock:
            self._closed = True
        self._inbox.close(f"{self._peer} closed the connection")
        if self._on_close is not None:
            self._on_close(self._ident)

    def send(self, data: bytes) -> None:
        """Send one message over the link."""
        with self._lock:
            if self._closed:
                raise ConnectionClosed(f"connection to {self._peer} is closed")
        self._link.send(Msg.DATA, self._ident, as_message(data))

    def recv(self, timeout: float | None = None) -> bytes:
        """The next message (see Connection.recv)."""
        return self._inbox.get(timeout, sender=self._peer)

    def close(self) -> None:
        """Close both directions; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._inbox.close(f"connection to {self._peer} was closed locally", discard=True)
        try:
            self._link.send(Msg.CLOSE, self._ident)
        except TransportError:
            pass
        if self._on_close is not None:
            self._on_close(self._ident)


class Endpoint:
    """Routes incoming link messages to relayed connections and to the calls waiting on them."""

    def __init__(self, link: IpcLink) -> None:
        self.link = link
        self._lock = threading.Lock()
        self._channels: dict[int, ChannelConnection] = {}
        self._waiting: dict[int, queue.Queue[tuple[Msg, bytes]]] = {}
        self._next = 0

    def new_ident(self) -> int:
        """A fresh ident for a call or a connection."""
        with self._lock:
            self._next += 1
            return self._next

    def add_channel(self, ident: int, peer: str) -> ChannelConnection:
        """Register a relayed connection under ``ident``."""
        channel = ChannelConnection(self.link, ident, peer, self._forget)
        with self._lock:
            self._channels[ident] = channel
        return channel

    def _forget(self, ident: int) -> None:
        with self._lock:
            self._channels.pop(ident, None)

    def waiter(self, ident: int) -> queue.Queue[tuple[Msg, bytes]]:
        """The queue where messages for call ``ident`` arrive."""
        with self._lock:
            return self._waiting.setdefault(ident, queue.Queue())

    def done(self, ident: int) -> None:
        """The call ``ident`` is over."""
        with self._lock:
            self._waiting.pop(ident, None)

    def route(self, kind: Msg, ident: int, body: bytes) -> bool:
        """Deliver data/close to connections and call messages to waiters; False if not ours."""
        if kind in (Msg.DATA, Msg.CLOSE):
            with self._lock:
                channel = self._channels.get(ident)
            if channel is None:
                return True  # a connection already closed here; drop what was in flight
            if kind == Msg.DATA:
                channel.feed(body)
            else:
                channel.feed_close()
            return True
        if kind in (Msg.RETURN, Msg.ERROR, Msg.OCALL, Msg.OCALL_RETURN, Msg.OCALL_ERROR):
            with self._lock:
                waiting = self._waiting.get(ident)
            if waiting is not None:
                waiting.put((kind, body))
            else:
                log.debug("Dropped a %s for call %d that nobody waits for.", kind.name, ident)
            return True
        return False

    def fail_all(self, reason: str) -> None:
        """The link is gone: wake every waiting call with an error and close every connection."""
        with self._lock:
            waiting = list(self._waiting.values())
            channels = list(self._channels.values())
        for item in waiting:
            item.put((Msg.ERROR, encode_error(reason)))
        for channel in channels:
            channel.feed_close()
