"""Chunk framing for byte streams: split a message into numbered chunks and join them back.

Each chunk is::

    version u8 | message id u64 | chunk index u32 | flags u8 (bit 0: last chunk) | data

The reassembler refuses a message over its size limit before buffering it, any out-of-order chunk
and unknown versions or flags.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from silotune.transport.base import TransportError

CHUNK_HEADER = struct.Struct("<BQIB")  # version, message id, chunk index, flags
CHUNK_VERSION = 1
FLAG_LAST = 1


def iter_chunks(message_id: int, data: bytes, chunk_bytes: int) -> Iterator[bytes]:
    """Split one message into chunks (an empty message is one empty last chunk).

    Parameters
    ----------
    message_id
        Sender-side id of the message (u64), the same in all its chunks.
    data
        The message.
    chunk_bytes
        Most data bytes per chunk.
    """
    view = memoryview(data)
    count = max(1, -(-len(view) // chunk_bytes))
    for index in range(count):
        flags = FLAG_LAST if index == count - 1 else 0
        header = CHUNK_HEADER.pack(CHUNK_VERSION, message_id, index, flags)
        yield header + view[index * chunk_bytes : (index + 1) * chunk_bytes]


class Reassembler:
    """Joins chunks back into messages, rejecting malformed or oversized input.

    Parameters
    ----------
    max_message_bytes
        Largest message accepted; a longer one raises before it is buffered.
    """

    def __init__(self, max_message_bytes: int) -> None:
        self._max = max_message_bytes
        self._parts: list[bytes] = []
        self._size = 0
        self._message_id: int | None = None
        self._next_index = 0

    @property
    def partial(self) -> bool:
        """Whether a message has started but not finished."""
        return self._message_id is not None

    def feed(self, chunk: bytes) -> bytes | None:
        """Add one chunk; return the whole message when this chunk completes it.

        Raises
        ------
        TransportError
            If the chunk is malformed, out of order, or the message grows past the limit.
        """
        if len(chunk) < CHUNK_HEADER.size:
            raise TransportError(f"Chunk of {len(chunk)} bytes is shorter than its header.")
        version, message_id, index, flags = CHUNK_HEADER.unpack_from(chunk)
        if version != CHUNK_VERSION:
            raise TransportError(
                f"Chunk version {version} is not supported; supported: {CHUNK_VERSION}."
            )
        if flags & ~FLAG_LAST:
            raise TransportError(f"Chunk has unknown flags {flags:#x}.")
        if self._message_id is None:
            self._message_id = message_id
        if message_id != self._message_id or index != self._next_index:
            raise TransportError(
                f"Chunk {index} of message {message_id} arrived while chunk {self._next_index} "
                f"of message {self._message_id} was expected."
            )
        self._size += len(chunk) - CHUNK_HEADER.size
        if self._size > self._max:
            raise TransportError(
                f"Message {message_id} exceeds the maximum message size of {self._max} bytes."
            )
        self._parts.append(chunk[CHUNK_HEADER.size :])
        self._next_index += 1
        if not flags & FLAG_LAST:
            return None
        message = b"".join(self._parts)
        self._parts, self._size, self._message_id, self._next_index = [], 0, None, 0
        return message
