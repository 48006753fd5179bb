"""Measurements: SHA-256 of the enclave's code (silotune's sources) plus its app and configuration.

``measurement = SHA-256(b"silotune/measurement/v1\\0" || code_digest || app || b"\\0" ||
canonical_json(app_config))`` where ``code_digest`` hashes every ``.py`` file of the installed
silotune package (sorted relative paths, each with its length and contents). Any change to
silotune's code, to the app's name or to one value of its configuration changes the measurement,
so a verifier that allow-lists one measurement accepts exactly one code and configuration.
Third-party packages (torch, transformers) and model weights are not measured; docs/enclave.md.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import silotune

__all__ = ["canonical_json", "code_digest", "measure"]

_DOMAIN = b"silotune/measurement/v1\x00"


def canonical_json(value: Any) -> bytes:
    """One byte string per JSON value: sorted keys, no spaces, ASCII, no NaN."""
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"an enclave app config must be plain JSON: {exc}") from None


def code_digest(root: Path | None = None) -> bytes:
    """SHA-256 over every ``.py`` file under the silotune package (or ``root``)."""
    base = root or Path(silotune.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(base.rglob("*.py")):
        name = path.relative_to(base).as_posix().encode("utf-8")
        data = path.read_bytes()
        digest.update(struct.pack(">I", len(name)) + name + struct.pack(">Q", len(data)) + data)
    return digest.digest()


def measure(app: str, app_config: dict[str, Any], code: bytes | None = None) -> bytes:
    """The measurement of ``app`` run with ``app_config`` by this silotune build (32 bytes)."""
    if not isinstance(app, str) or not app or "\x00" in app:
        raise ValueError(f"app must be a non-empty name, got {app!r}")
    digest = hashlib.sha256(_DOMAIN)
    digest.update(code if code is not None else code_digest())
    digest.update(app.encode("utf-8") + b"\x00")
    digest.update(canonical_json(app_config))
    return digest.digest()
