"""Secure-aggregation stage messages: ``magic | version | json length | json | payload``.

The JSON header names the stage and carries small fields (ids, hex keys and signatures); the
payload carries bulk bytes (a masked vector). Sizes are checked before anything is parsed, every
field is read through a typed accessor that names it in its error, and nothing is unpickled.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

from silotune.errors import MessageError

__all__ = ["MessageError", "Reader", "pack", "unpack"]

MAGIC = b"STSG"
VERSION = 1
MAX_HEADER = 8 << 20
_HEAD = struct.Struct(">4sBI")  # magic, version, header length


def pack(stage: str, fields: Mapping[str, Any], payload: bytes = b"") -> bytes:
    """One stage message: the stage name and ``fields`` as JSON, then ``payload``."""
    header = json.dumps({"stage": stage, **fields}, sort_keys=True, separators=(",", ":")).encode()
    return _HEAD.pack(MAGIC, VERSION, len(header)) + header + bytes(payload)


def unpack(data: object, stage: str, what: str) -> tuple[Reader, bytes]:
    """Parse a message of ``stage``; returns (a field reader, the payload)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"{what} must be bytes, got {type(data).__name__}")
    raw = bytes(data)
    if len(raw) < _HEAD.size:
        raise MessageError(f"{what} is truncated ({len(raw)} bytes)")
    magic, version, size = _HEAD.unpack_from(raw, 0)
    if magic != MAGIC or version != VERSION:
        raise MessageError(f"{what} has a bad magic or version (expected {MAGIC!r} v{VERSION})")
    if size > MAX_HEADER or _HEAD.size + size > len(raw):
        raise MessageError(f"{what} has a header of {size} bytes; it is truncated or too large")
    try:
        doc = json.loads(raw[_HEAD.size : _HEAD.size + size].decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MessageError(f"{what} has a header that is not UTF-8 JSON") from None
    if not isinstance(doc, dict):
        raise MessageError(f"{what} has a header that is not a JSON object")
    reader = Reader(doc, what)
    got = reader.text("stage")
    if got != stage:
        raise MessageError(f"{what} is for stage {got!r}, expected {stage!r}")
    return reader, raw[_HEAD.size + size :]


class Reader:
    """Typed access to a JSON object; every failure names the message and the field."""

    def __init__(self, doc: Mapping[str, Any], what: str) -> None:
        self.doc, self.what = doc, what

    def _get(self, key: str) -> Any:
        if key not in self.doc:
            raise MessageError(f"{self.what} lacks field '{key}'")
        return self.doc[key]

    def _bad(self, key: str, expected: str) -> MessageError:
        value = repr(self.doc.get(key))[:60]
        return MessageError(f"{self.what}: field '{key}' must be {expected}, got {value}")

    def integer(self, key: str, low: int, high: int) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self._bad(key, f"an integer in [{low}, {high}]")
        return value

    def number(self, key: str) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(key, "a number")
        return float(value)

    def text(self, key: str, max_len: int = 256) -> str:
        value = self._get(key)
        if not isinstance(value, str) or len(value) > max_len:
            raise self._bad(key, f"a string of at most {max_len} characters")
        return value

    def blob(self, key: str, size: int | None = None, max_size: int = 1 << 20) -> bytes:
        """A hex-encoded bytes field (of exactly ``size`` bytes when given)."""
        value = self._get(key)
        expected = f"{size} bytes in hex" if size is not None else "bytes in hex"
        if not isinstance(value, str) or len(value) > 2 * max_size:
            raise self._bad(key, expected)
        try:
            out = bytes.fromhex(value)
        except ValueError:
            raise self._bad(key, expected) from None
        if size is not None and len(out) != size:
            raise self._bad(key, expected)
        return out

    def ids(self, key: str) -> list[int]:
        value = self._get(key)
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63 for v in value
        ):
            raise self._bad(key, "a list of silo ids")
        if len(set(value)) != len(value):
            raise MessageError(f"{self.what}: field '{key}' lists a silo twice")
        return list(value)

    def obj(self, key: str) -> Reader:
        """A nested JSON object, read with the same checks."""
        value = self._get(key)
        if not isinstance(value, dict):
            raise self._bad(key, "an object")
        return Reader(value, f"{self.what}, field '{key}'")

    def table(self, key: str) -> dict[int, Reader]:
        """A JSON object keyed by silo id (decimal strings) whose values are objects."""
        value = self._get(key)
        if not isinstance(value, dict):
            raise self._bad(key, "an object keyed by silo id")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not k.isdigit() or len(k) > 19 or not isinstance(v, dict):
                raise self._bad(key, "an object keyed by silo id")
            out[int(k)] = Reader(v, f"{self.what}, entry {k} of '{key}'")
        return out

    def items(self, key: str) -> list[Reader]:
        value = self._get(key)
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self._bad(key, "a list of objects")
        return [Reader(v, f"{self.what}, item {i} of '{key}'") for i, v in enumerate(value)]
