"""A Flower message body across the enclave boundary: config values as JSON, arrays as raw bytes.

The federated adapter enclave answers the silo's stage messages (:mod:`silotune.federated.silo`)
itself; its host only relays them. A ``RecordDict`` travels as the call's ``meta`` (config
records, each array's dtype and shape) and one bytes value per array (``a/<record>/<key>``).
Nothing is unpickled; dtypes come from a short allow-list and every size is checked against its
declared shape before an array is built.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from silotune.enclave.base import EnclaveError, Tensors

__all__ = ["decode_records", "encode_records"]

# Every dtype a silo stage sends or receives: bytes, updates, supports, masked vectors.
_DTYPES = ("uint8", "float32", "float64", "int64", "uint32", "uint64")
_SCALARS = (bool, int, float, str)


def encode_records(content: RecordDict) -> tuple[dict[str, Any], Tensors]:
    """``(meta, values)`` for :meth:`~silotune.enclave.base.Enclave.call`."""
    configs: dict[str, dict[str, Any]] = {}
    arrays: dict[str, dict[str, Any]] = {}
    values: Tensors = {}
    for name, record in content.config_records.items():
        configs[name] = {}
        for key, value in record.items():
            if not isinstance(value, _SCALARS):
                raise EnclaveError(f"config value {name}/{key} is not a bool, number or string")
            configs[name][key] = value
    for name, record in content.array_records.items():
        arrays[name] = {}
        for key, array in record.items():
            data = np.ascontiguousarray(array.numpy())
            if data.dtype.name not in _DTYPES:
                raise EnclaveError(f"array {name}/{key} has dtype {data.dtype.name}")
            arrays[name][key] = {"dtype": data.dtype.name, "shape": list(data.shape)}
            values[f"a/{name}/{key}"] = data.tobytes()
    return {"configs": configs, "arrays": arrays}, values


def decode_records(meta: dict[str, Any], values: Tensors) -> RecordDict:
    """The ``RecordDict`` that :func:`encode_records` described; EnclaveError if malformed."""
    configs, arrays = meta.get("configs"), meta.get("arrays")
    if not isinstance(configs, dict) or not isinstance(arrays, dict):
        raise EnclaveError("a relayed message needs 'configs' and 'arrays' in its meta")
    body = RecordDict()
    for name, record in configs.items():
        if not isinstance(record, dict) or not all(
            isinstance(v, _SCALARS) for v in record.values()
        ):
            raise EnclaveError(f"relayed config record {name!r} holds a value of another type")
        body[str(name)] = ConfigRecord(record)
    for name, record in arrays.items():
        if not isinstance(record, dict):
            raise EnclaveError(f"relayed array record {name!r} is not a mapping")
        items = {}
        for key, spec in record.items():
            items[str(key)] = Array(_array(f"{name}/{key}", spec, values.get(f"a/{name}/{key}")))
        body[str(name)] = ArrayRecord(items)  # type: ignore[arg-type]
    return body


def _array(where: str, spec: Any, data: object) -> np.ndarray:
    if not isinstance(spec, dict) or spec.get("dtype") not in _DTYPES:
        raise EnclaveError(f"relayed array {where} has no allowed dtype ({', '.join(_DTYPES)})")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise EnclaveError(f"relayed array {where} has no valid shape")
    if not isinstance(data, bytes):
        raise EnclaveError(f"relayed array {where} is missing its bytes")
    dtype = np.dtype(spec["dtype"])
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise EnclaveError(
            f"relayed array {where} holds {len(data)} bytes; its shape {shape} needs "
            f"{math.prod(shape) * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
