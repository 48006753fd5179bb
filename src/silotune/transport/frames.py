"""Split-learning frames: a versioned JSON header plus a safetensors payload, validated before use.

Wire layout of one frame (all integers little-endian)::

    b"STF1"          4 bytes   magic (the trailing "1" is the layout generation)
    header_length    4 bytes   u32, length of the JSON header
    header           N bytes   UTF-8 JSON object (see below)
    payload          ...       a safetensors file holding exactly the tensors the header lists
    data             D bytes   opaque bytes (``data`` in the header gives D; often 0)

Header fields: ``version`` (int), ``kind`` (one of :data:`KINDS`), ``step`` (int >= 0), ``silo``
(str), ``tensors`` (list of ``{"name", "dtype", "wire_dtype", "shape"}``), ``data`` (the length
of the opaque bytes at the end: protocol messages such as secure-aggregation stages travel there,
never disguised as tensors) and ``meta`` (a JSON object for extra fields such as attention-mask
lengths).

Everything received is untrusted: :func:`decode_frame` checks every size, dtype and offset against
the header and :class:`FrameLimits` before a single tensor is allocated, and never unpickles.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch

from silotune.errors import FrameError

__all__ = [
    "DTYPES",
    "FRAME_VERSION",
    "KINDS",
    "MAGIC",
    "Frame",
    "FrameError",
    "FrameLimits",
    "add_noise",
    "decode_frame",
    "encode_frame",
]

MAGIC = b"STF1"
FRAME_VERSION = 2  # 2: the opaque ``data`` section

KIND_FORWARD = "forward"  # activations, silo -> trunk (and trunk outputs, trunk -> silo tail)
KIND_BACKWARD = "backward"  # gradients, trunk -> silo (and tail gradients, silo -> trunk)
KIND_ERROR = "error"  # the peer gives up on this step; ``meta["message"]`` says why
KIND_BYE = "bye"  # orderly end of a session
KIND_JOIN = "join"  # a silo announces itself (meta: examples, steps) before its first step
KIND_COMMIT = "commit"  # a silo ends an optimizer step (meta: gradient clipping coefficient)
KIND_SYNC = "sync"  # adapter tensors for averaging across silos, and the averaged reply
KIND_SECAGG = "secagg"  # one stage of secure averaging (meta: stage), see split/secure_averaging
KINDS = frozenset(
    {
        KIND_FORWARD,
        KIND_BACKWARD,
        KIND_ERROR,
        KIND_BYE,
        KIND_JOIN,
        KIND_COMMIT,
        KIND_SYNC,
        KIND_SECAGG,
    }
)

# Frame-header dtype name -> (torch dtype, safetensors dtype tag, bytes per element).
DTYPES: dict[str, tuple[torch.dtype, str, int]] = {
    "float32": (torch.float32, "F32", 4),
    "float16": (torch.float16, "F16", 2),
    "bfloat16": (torch.bfloat16, "BF16", 2),
    "int64": (torch.int64, "I64", 8),
    "int32": (torch.int32, "I32", 4),
    "bool": (torch.bool, "BOOL", 1),
}
_NAME_OF_DTYPE = {torch_dtype: name for name, (torch_dtype, _, _) in DTYPES.items()}
_WIRE_DTYPES = ("float16", "bfloat16")  # allowed compressed encodings of a float32 tensor

_PREFIX = struct.Struct("<4sI")  # magic, header length
_ST_PREFIX = struct.Struct("<Q")  # safetensors header length
_MAX_NAME_CHARS = 256
_MAX_SILO_CHARS = 256
_MAX_STEP = 2**63 - 1


@dataclass(frozen=True)
class FrameLimits:
    """Bounds a receiver enforces on every frame before allocating anything.

    Parameters
    ----------
    max_frame_bytes
        Largest accepted frame, header and payload together.
    max_header_bytes
        Largest accepted frame header and safetensors header (each).
    max_tensors
        Most tensors one frame may carry.
    max_rank
        Most dimensions one tensor may have.
    max_numel
        Most elements one tensor may have.
    allowed_kinds
        Frame kinds this receiver accepts.
    """

    max_frame_bytes: int = 256 * 2**20
    max_header_bytes: int = 64 * 2**10
    max_tensors: int = 64
    max_rank: int = 4
    max_numel: int = 2**28
    allowed_kinds: frozenset[str] = field(default=KINDS)

    def __post_init__(self) -> None:
        for name in ("max_frame_bytes", "max_header_bytes", "max_tensors", "max_rank", "max_numel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FrameLimits.{name} must be a positive int, got {value!r}.")
        unknown = set(self.allowed_kinds) - KINDS
        if unknown:
            raise ValueError(
                f"FrameLimits.allowed_kinds has unknown kinds {sorted(unknown)}; "
                f"allowed: {sorted(KINDS)}."
            )


DEFAULT_LIMITS = FrameLimits()


@dataclass(frozen=True)
class TensorSpec:
    """What the frame header declares about one tensor."""

    name: str
    dtype: str  # dtype handed to the receiver after decoding
    wire_dtype: str  # dtype of the bytes on the wire (differs only for compressed float32)
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        return math.prod(self.shape)

    @property
    def wire_bytes(self) -> int:
        """Bytes the tensor occupies in the safetensors payload."""
        return self.numel * DTYPES[self.wire_dtype][2]


@dataclass(frozen=True)
class Frame:
    """A decoded, validated frame; tensors are CPU tensors in their declared dtype."""

    kind: str
    step: int
    silo_id: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    version: int = FRAME_VERSION
    data: bytes = b""


# --------------------------------------------------------------------------- encoding


def encode_frame(
    kind: str,
    step: int,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any] | None = None,
    *,
    silo_id: str = "",
    activation_dtype: str | torch.dtype | None = None,
    data: bytes = b"",
) -> bytes:
    """Serialize tensors, metadata and opaque bytes into one frame.

    Parameters
    ----------
    kind
        One of :data:`KINDS`.
    step
        Training step the frame belongs to (int >= 0).
    tensors
        Named tensors; any device, detached and made contiguous on the CPU here.
    meta
        Extra JSON-serializable fields (no NaN/Infinity), e.g. attention-mask lengths.
    silo_id
        Identifier of the silo the frame belongs to.
    activation_dtype
        ``None`` keeps dtypes; ``"float16"`` or ``"bfloat16"`` sends float32 tensors in that dtype
        (half the bytes) and :func:`decode_frame` restores float32.
    data
        Opaque bytes carried after the tensors (a protocol message of another layer).

    Returns
    -------
    bytes
        The frame.

    Raises
    ------
    ValueError, TypeError
        If an argument is out of range or of the wrong type.
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown frame kind {kind!r}; allowed: {sorted(KINDS)}.")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= _MAX_STEP:
        raise ValueError(f"Frame step must be an int in [0, 2**63), got {step!r}.")
    if not isinstance(silo_id, str) or len(silo_id) > _MAX_SILO_CHARS:
        raise ValueError(f"silo_id must be a str of at most {_MAX_SILO_CHARS} characters.")
    wire_float = _parse_activation_dtype(activation_dtype)

    specs: list[dict[str, Any]] = []
    on_wire: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME_CHARS:
            raise ValueError(f"Tensor names must be non-empty str of <= {_MAX_NAME_CHARS} chars.")
        if name == "__metadata__":
            raise ValueError("Tensor name '__metadata__' is reserved by safetensors.")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"Tensor {name!r} must be a torch.Tensor, got {type(tensor).__name__}.")
        dtype = _NAME_OF_DTYPE.get(tensor.dtype)
        if dtype is None:
            raise ValueError(
                f"Tensor {name!r} has dtype {tensor.dtype}; allowed: {sorted(DTYPES)}."
            )
        if tensor.dim() > DEFAULT_LIMITS.max_rank:
            raise ValueError(
                f"Tensor {name!r} has rank {tensor.dim()}; at most {DEFAULT_LIMITS.max_rank}."
            )
        wire_dtype = wire_float if (dtype == "float32" and wire_float) else dtype
        wire = tensor.detach().to(device="cpu", dtype=DTYPES[wire_dtype][0]).contiguous()
        on_wire[name] = wire
        specs.append(
            {"name": name, "dtype": dtype, "wire_dtype": wire_dtype, "shape": list(wire.shape)}
        )

    header = {
        "version": FRAME_VERSION,
        "kind": kind,
        "step": step,
        "silo": silo_id,
        "tensors": specs,
        "data": len(data),
        "meta": dict(meta or {}),
    }
    try:
        header_bytes = json.dumps(header, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"Frame meta must be JSON-serializable without NaN/Infinity: {exc}"
        ) from exc
    if len(header_bytes) > DEFAULT_LIMITS.max_header_bytes:
        raise ValueError(
            f"Frame header is {len(header_bytes)} bytes; at most "
            f"{DEFAULT_LIMITS.max_header_bytes} (shrink meta or the number of tensors)."
        )
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"Frame data must be bytes, got {type(data).__name__}.")
    payload = safetensors.torch.save(on_wire)
    return b"".join((_PREFIX.pack(MAGIC, len(header_bytes)), header_bytes, payload, data))


def _parse_activation_dtype(value: str | torch.dtype | None) -> str | None:
    if value is None:
        return None
    name = _NAME_OF_DTYPE.get(value) if isinstance(value, torch.dtype) else value
    if name == "float32":
        return None
    if name not in _WIRE_DTYPES:
        raise ValueError(
            f"activation_dtype must be None, 'float32', 'float16' or 'bfloat16', got {value!r}."
        )
    return name


# --------------------------------------------------------------------------- decoding


def decode_frame(
    data: bytes | bytearray | memoryview, limits: FrameLimits = DEFAULT_LIMITS
) -> Frame:
    """Validate and decode one frame received from an untrusted peer.

    Parameters
    ----------
    data
        The frame bytes.
    limits
        Bounds to enforce; checked before any tensor is allocated.

    Returns
    -------
    Frame
        The frame, with compressed float32 tensors restored to float32.

    Raises
    ------
    FrameError
        If the frame is truncated, oversized, has a wrong magic/version/kind/dtype, or its
        safetensors payload disagrees with the header.
    """
    view = memoryview(data).cast("B")
    if len(view) > limits.max_frame_bytes:
        raise FrameError(
            f"Frame is {len(view)} bytes; the limit is {limits.max_frame_bytes} bytes."
        )
    if len(view) < _PREFIX.size:
        raise FrameError(f"Frame is truncated: {len(view)} bytes, the prefix alone is 8 bytes.")
    magic, header_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise FrameError(f"Frame has magic {bytes(magic)!r}; expected {MAGIC!r}.")
    if header_len > limits.max_header_bytes:
        raise FrameError(
            f"Frame header declares {header_len} bytes; the limit is {limits.max_header_bytes}."
        )
    if _PREFIX.size + header_len > len(view):
        raise FrameError(
            f"Frame is truncated: header declares {header_len} bytes but only "
            f"{len(view) - _PREFIX.size} follow the prefix."
        )
    header = _parse_json(view[_PREFIX.size : _PREFIX.size + header_len], "frame header")
    kind, step, silo_id, specs, meta, data_len = _validate_header(header, limits)
    if _PREFIX.size + header_len + data_len > len(view):
        raise FrameError(f"Frame is truncated: its header declares {data_len} bytes of data.")
    end = len(view) - data_len
    payload = view[_PREFIX.size + header_len : end]
    _check_payload(payload, specs, limits)
    try:
        loaded = safetensors.torch.load(bytes(payload))
    except Exception as exc:  # the Rust error types are not public API
        raise FrameError(f"Frame payload is not valid safetensors: {exc}") from exc

    tensors: dict[str, torch.Tensor] = {}
    for spec in specs:
        tensor = loaded[spec.name]
        if spec.dtype != spec.wire_dtype:
            tensor = tensor.to(DTYPES[spec.dtype][0])
        tensors[spec.name] = tensor
    data = bytes(view[end:])
    return Frame(kind=kind, step=step, silo_id=silo_id, tensors=tensors, meta=meta, data=data)


def _reject_constant(token: str) -> Any:
    raise FrameError(f"JSON constant {token} is not allowed in a frame.")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise FrameError(f"JSON object repeats the key {key!r}.")
        result[key] = value
    return result


def _parse_json(raw: memoryview, what: str) -> Any:
    try:
        text = bytes(raw).decode("utf-8")
        return json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_reject_constant)
    except FrameError as exc:
        raise FrameError(f"The {what} is invalid: {exc}") from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameError(f"The {what} is not valid UTF-8 JSON: {exc}") from exc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_header(
    header: Any, limits: FrameLimits
) -> tuple[str, int, str, list[TensorSpec], dict[str, Any], int]:
    if not isinstance(header, dict):
        raise FrameError("The frame header must be a JSON object.")
    expected = {"version", "kind", "step", "silo", "tensors", "data", "meta"}
    if set(header) != expected:
        raise FrameError(
            f"The frame header has fields {sorted(header)}; expected exactly {sorted(expected)}."
        )
    if header["version"] != FRAME_VERSION or not _is_int(header["version"]):
        raise FrameError(
            f"Frame version {header['version']!r} is not supported; supported: {FRAME_VERSION}."
        )
    kind = header["kind"]
    if not isinstance(kind, str) or kind not in limits.allowed_kinds:
        raise FrameError(f"Unknown frame kind {kind!r}; allowed: {sorted(limits.allowed_kinds)}.")
    step = header["step"]
    if not _is_int(step) or not 0 <= step <= _MAX_STEP:
        raise FrameError(f"Frame step must be an int in [0, 2**63), got {step!r}.")
    silo_id = header["silo"]
    if not isinstance(silo_id, str) or len(silo_id) > _MAX_SILO_CHARS:
        raise FrameError(f"Frame silo id must be a str of at most {_MAX_SILO_CHARS} characters.")
    meta = header["meta"]
    if not isinstance(meta, dict):
        raise FrameError("Frame meta must be a JSON object.")
    data_len = header["data"]
    if not _is_int(data_len) or not 0 <= data_len <= limits.max_frame_bytes:
        raise FrameError(f"Frame field 'data' must be a byte count, got {data_len!r}.")
    raw_specs = header["tensors"]
    if not isinstance(raw_specs, list):
        raise FrameError("Frame field 'tensors' must be a list.")
    if len(raw_specs) > limits.max_tensors:
        raise FrameError(
            f"Frame declares {len(raw_specs)} tensors; the limit is {limits.max_tensors}."
        )

    specs: list[TensorSpec] = []
    seen: set[str] = set()
    total = 0
    for raw in raw_specs:
        spec = _validate_spec(raw, limits)
        if spec.name in seen:
            raise FrameError(f"Frame declares tensor {spec.name!r} twice.")
        seen.add(spec.name)
        total += spec.wire_bytes
        if total > limits.max_frame_bytes:
            raise FrameError(
                f"Frame tensors total more than {limits.max_frame_bytes} bytes (the frame limit)."
            )
        specs.append(spec)
    return kind, step, silo_id, specs, meta, data_len


def _validate_spec(raw: Any, limits: FrameLimits) -> TensorSpec:
    keys = {"name", "dtype", "wire_dtype", "shape"}
    if not isinstance(raw, dict) or set(raw) != keys:
        raise FrameError(f"Each tensor spec must be an object with exactly {sorted(keys)}.")
    name, dtype, wire_dtype, shape = raw["name"], raw["dtype"], raw["wire_dtype"], raw["shape"]
    if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME_CHARS or name == "__metadata__":
        raise FrameError(
            f"Tensor name {name!r} is invalid; use a non-empty str of <= {_MAX_NAME_CHARS} chars."
        )
    for label, value in (("dtype", dtype), ("wire_dtype", wire_dtype)):
        if not isinstance(value, str) or value not in DTYPES:
            raise FrameError(f"Tensor {name!r} has {label} {value!r}; allowed: {sorted(DTYPES)}.")
    if wire_dtype != dtype and not (dtype == "float32" and wire_dtype in _WIRE_DTYPES):
        raise FrameError(
            f"Tensor {name!r} declares dtype {dtype} sent as {wire_dtype}; only float32 may be "
            f"sent as {' or '.join(_WIRE_DTYPES)}."
        )
    if not isinstance(shape, list) or len(shape) > limits.max_rank:
        raise FrameError(
            f"Tensor {name!r} shape must be a list of at most {limits.max_rank} dimensions."
        )
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise FrameError(f"Tensor {name!r} shape {shape!r} must hold non-negative ints.")
    spec = TensorSpec(name=name, dtype=dtype, wire_dtype=wire_dtype, shape=tuple(shape))
    # Python ints do not overflow, so a huge declared shape is caught here, before allocation.
    if spec.numel > limits.max_numel:
        raise FrameError(
            f"Tensor {name!r} declares {spec.numel} elements; the limit is {limits.max_numel}."
        )
    return spec


def _check_payload(payload: memoryview, specs: list[TensorSpec], limits: FrameLimits) -> None:
    """Check the safetensors header against the frame header and the payload length."""
    if len(payload) < _ST_PREFIX.size:
        raise FrameError(
            f"Frame payload is truncated: {len(payload)} bytes, safetensors needs at least 8."
        )
    (st_len,) = _ST_PREFIX.unpack_from(payload)
    if st_len > limits.max_header_bytes:
        raise FrameError(
            f"Safetensors header declares {st_len} bytes; the limit is {limits.max_header_bytes}."
        )
    if _ST_PREFIX.size + st_len > len(payload):
        raise FrameError(
            f"Frame payload is truncated: safetensors header declares {st_len} bytes but only "
            f"{len(payload) - _ST_PREFIX.size} follow."
        )
    st_header = _parse_json(
        payload[_ST_PREFIX.size : _ST_PREFIX.size + st_len], "safetensors header"
    )
    if not isinstance(st_header, dict):
        raise FrameError("The safetensors header must be a JSON object.")
    st_header.pop("__metadata__", None)
    by_name = {spec.name: spec for spec in specs}
    if set(st_header) != set(by_name):
        raise FrameError(
            f"Payload holds tensors {sorted(st_header)} but the frame header lists "
            f"{sorted(by_name)}."
        )

    spans: list[tuple[int, int, str]] = []
    for name, entry in st_header.items():
        spec = by_name[name]
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise FrameError(f"Safetensors entry for {name!r} is malformed.")
        tag = DTYPES[spec.wire_dtype][1]
        if entry["dtype"] != tag:
            raise FrameError(
                f"Tensor {name!r} is {entry['dtype']!r} in the payload but the frame header "
                f"declares {spec.wire_dtype} ({tag})."
            )
        if entry["shape"] != list(spec.shape):
            raise FrameError(
                f"Tensor {name!r} has shape {entry['shape']!r} in the payload but the frame "
                f"header declares {list(spec.shape)}."
            )
        offsets = entry["data_offsets"]
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or offsets[1] - offsets[0] != spec.wire_bytes
            or offsets[0] < 0
        ):
            raise FrameError(
                f"Tensor {name!r} has data offsets {offsets!r}; expected a span of "
                f"{spec.wire_bytes} bytes."
            )
        spans.append((offsets[0], offsets[1], name))

    # The spans must tile the data section exactly: no gaps, overlaps or trailing bytes.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise FrameError(
                f"Tensor {name!r} data starts at byte {begin} but should start at {position} "
                "(tensor data must not overlap or leave gaps)."
            )
        position = end
    data_len = len(payload) - _ST_PREFIX.size - st_len
    if data_len != position:
        raise FrameError(
            f"Frame payload holds {data_len} data bytes but its tensors need {position} "
            f"({'trailing garbage' if data_len > position else 'truncated'})."
        )


# --------------------------------------------------------------------------- noise


def add_noise(
    tensor: torch.Tensor, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Return ``tensor`` plus Gaussian noise of standard deviation ``sigma`` (FedSEA-LLaMA style).

    The noise blurs activations before they leave a silo; it is not a security primitive, so a
    torch generator is fine. Gradients flow through unchanged (the noise is a constant).

    Parameters
    ----------
    tensor
        A floating-point tensor.
    sigma
        Standard deviation, finite and >= 0; 0 returns ``tensor`` itself.
    generator
        Optional torch generator for reproducible noise; its device may differ from the tensor's.

    Returns
    -------
    torch.Tensor
        The noisy tensor, same shape, dtype and device.
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma):
        raise ValueError(f"Noise sigma must be a finite number >= 0, got {sigma!r}.")
    if sigma < 0:
        raise ValueError(f"Noise sigma must be a finite number >= 0, got {sigma!r}.")
    if not tensor.is_floating_point():
        raise ValueError(f"add_noise needs a floating-point tensor, got dtype {tensor.dtype}.")
    if sigma == 0:
        return tensor
    noise_device = generator.device if generator is not None else tensor.device
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32, device=noise_device)
    return tensor + (noise * sigma).to(device=tensor.device, dtype=tensor.dtype)
