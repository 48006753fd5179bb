"""Adapter tensors as one flat float32 vector, and bytes as Flower arrays (no pickle on the wire)."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from numpy.typing import NDArray
from torch import nn

from silotune.errors import FederationError


def trainable(model: nn.Module) -> list[torch.nn.Parameter]:
    """The adapter's trainable parameters, in the model's (deterministic) registration order."""
    return [p for p in model.parameters() if p.requires_grad]


def flatten(model: nn.Module) -> NDArray[np.float32]:
    """Concatenate the trainable parameters into one float32 vector (L,) on the CPU."""
    with torch.no_grad():
        parts = [p.detach().float().reshape(-1).cpu() for p in trainable(model)]
    return torch.cat(parts).numpy().astype(np.float32, copy=False)


def load_flat(model: nn.Module, vector: NDArray[np.float32]) -> None:
    """Write a flat vector (from :func:`flatten` on the same job) into the trainable parameters."""
    params = trainable(model)
    total = sum(p.numel() for p in params)
    if vector.shape != (total,):
        raise FederationError(
            f"adapter vector holds {vector.size} values; this job's adapter has {total}"
        )
    if not np.isfinite(vector).all():
        raise FederationError("adapter vector holds NaN or infinite values")
    source = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32))
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(source[offset : offset + n].view_as(p).to(p.device, p.dtype))
            offset += n


def to_array(values: NDArray[np.generic] | bytes) -> Array:
    """Bytes or a 1-D numpy array as a Flower Array (serialised with np.save, allow_pickle=False)."""
    if isinstance(values, (bytes, bytearray)):
        values = np.frombuffer(bytes(values), dtype=np.uint8)
    return Array(np.ascontiguousarray(values))


def get_vector(
    content: RecordDict, record: str, key: str, dtype: type[np.generic], length: int | None = None
) -> NDArray[np.generic]:
    """Read a 1-D array from a message, checking its dtype and (optionally) its length."""
    try:
        arr = content.array_records[record][key].numpy()
    except KeyError:
        raise FederationError(f"message lacks array '{record}/{key}'") from None
    if arr.dtype != np.dtype(dtype) or arr.ndim != 1:
        raise FederationError(
            f"array '{record}/{key}' must be 1-D {np.dtype(dtype).name}, got {arr.ndim}-D "
            f"{arr.dtype.name}"
        )
    if length is not None and arr.size != length:
        raise FederationError(f"array '{record}/{key}' holds {arr.size} values, expected {length}")
    return arr


def get_bytes(content: RecordDict, record: str, key: str) -> bytes:
    """Read bytes sent with :func:`to_array`."""
    return get_vector(content, record, key, np.uint8).tobytes()


def get_config(content: RecordDict, record: str = "config") -> ConfigRecord:
    """The message's config record, or a clear error."""
    if record not in content.config_records:
        raise FederationError(f"message lacks config record '{record}'")
    return content.config_records[record]


def records(arrays: dict[str, Array] | None = None, **config: object) -> RecordDict:
    """A message body: one ArrayRecord 'arrays' and one ConfigRecord 'config'."""
    body = RecordDict()
    body["config"] = ConfigRecord(dict(config))  # type: ignore[arg-type]
    if arrays:
        body["arrays"] = ArrayRecord(arrays)
    return body
