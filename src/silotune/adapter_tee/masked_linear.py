"""Outsource frozen linear layers from the enclave to the REE on one-time-masked inputs (Slalom).

Both ends of the protocol live here. Inside the enclave, :func:`outsource_linears` swaps every
frozen ``nn.Linear`` of a model for an :class:`OutsourcedLinear`; the model's own code (norms,
rotary attention, SiLU, residuals, LoRA branches, the loss) runs unchanged in the enclave, and only
the frozen matmuls leave it, through :class:`LinearOffload`:

* forward, ``y = x W^T + b``: the enclave draws a fresh mask ``r = s * z`` (``z ~ N(0, 1)`` from
  :class:`~silotune.adapter_tee.masked_stream.MaskStream`, ``s = mask_std * max|x|``), ocalls
  ``linear`` with ``x + r`` only, gets ``(x + r) W^T`` back and subtracts ``s * (z W^T)``;
* backward, ``dx = g W``: the same with ``linear_t``, ``g + r`` and ``s * (z W)``.

With a :class:`~silotune.adapter_tee.mask_pool.MaskPool` (``enclave.unblinding: offline``) ``z``
and its factors ``z W^T`` / ``z W`` were computed before the step, and the step does no frozen
matmul; without one (``online``) the enclave draws ``z`` and multiplies it by ``W`` in the step.

The frozen weights' own gradients are never needed. :class:`FrozenLinearServer` is the REE's end:
it holds the frozen weights by module path and answers those two ocalls. The scale uses the largest
magnitude, not the RMS, so that a sparse tensor (a gradient that is zero except at a few target
positions) has no element that stands out of its mask; docs/adapter-in-tee.md measures the rest.

A tensor fed to several linears in a row (q, k and v share their input; so do gate and up) is
masked once, whereas fresh masks on the same tensor would hand the REE several noisy copies to
average; after the first pass the whole group is asked for in one ocall. Every answer passes
Freivalds' check against a fresh secret vector before it is used, so an REE that answers with
anything but the product is caught (:class:`TamperedResultError`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from silotune.adapter_tee.mask_pool import LINEAR, LINEAR_T, MaskPool
from silotune.adapter_tee.masked_stream import MaskStream
from silotune.errors import TamperedResultError

__all__ = [
    "Blind",
    "FrozenLinearServer",
    "LinearOffload",
    "OffloadStats",
    "Ocall",
    "OutsourcedLinear",
    "TamperedResultError",
    "from_wire",
    "frozen_linear_weights",
    "outsource_linears",
    "to_wire",
]

Tensors = dict[str, torch.Tensor]
Ocall = Callable[[str, dict[str, Any], Tensors], tuple[dict[str, Any], Tensors]]
"""The enclave's call into the REE: ``(method, meta, tensors) -> (meta, tensors)``."""

# Masked tensors travel and are multiplied in float64: a mask many times larger than the tensor
# then still leaves far more than float32's 24 bits of it, so the unmasked result equals the
# float32 one up to float32 rounding, whatever enclave.mask_std is (docs/adapter-in-tee.md).
WIRE_DTYPE = torch.float64
# Freivalds' check allowance, relative to |sent row| * |W^T v|: float64 rounding measured at most
# 7e-16 of it on tiny-llama and 1.9e-15 on SmolLM2-135M (masks of 1e4 x the tensor's peak); a row
# the REE changes by less than about 1e-6 of the true product's norm may pass, larger is caught.
FREIVALDS_TOL = 1e-12


@dataclass
class OffloadStats:
    """What outsourcing cost, summed since the last :meth:`LinearOffload.take_stats`.

    ``unblind_s`` is removing the masks from the answers: with unblinding ``online`` it includes
    computing the factors ``z W^T`` (the frozen matmuls a second time), with ``offline`` only
    the subtraction of precomputed ones. ``mask_s`` likewise includes drawing ``z`` only online.
    """

    ocalls: int = 0
    masks: int = 0
    factors_online: int = 0  # unblinding factors computed in the step (frozen matmuls)
    bytes_sent: int = 0
    mask_s: float = 0.0
    unblind_s: float = 0.0
    ocall_s: float = 0.0
    verify_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "ocalls": self.ocalls,
            "masks": self.masks,
            "factors_online": self.factors_online,
            "bytes_sent": self.bytes_sent,
            "mask_s": self.mask_s,
            "unblind_s": self.unblind_s,
            "ocall_s": self.ocall_s,
            "verify_s": self.verify_s,
        }


@dataclass(frozen=True)
class Blind:
    """A fresh mask for one tensor: ``masked = x + scale * z``, with any precomputed factors.

    ``factors`` maps layer name -> ``z W^T`` (or ``z W``) in ``z``'s leading shape; a layer not in
    it has its factor computed online.
    """

    scale: float
    z: torch.Tensor
    masked: torch.Tensor
    factors: dict[str, torch.Tensor]


@dataclass
class _Masked:
    """The last masked forward input, kept so that the next linears on the same tensor reuse it.

    ``prefetched`` holds the REE's (checked) answers for the layers that read the same tensor
    after ``leader``, asked for in the leader's ocall.
    """

    source: torch.Tensor
    version: int
    blind: Blind
    leader: str
    prefetched: dict[str, torch.Tensor]


@dataclass
class LinearOffload:
    """The enclave's side: masks tensors, ocalls the REE, removes the masks from the answers.

    Parameters
    ----------
    masks
        The enclave's mask stream (its key never leaves the enclave).
    mask_std
        Mask standard deviation as a multiple of each tensor's largest magnitude.
    pool
        Precomputed masks and factors (offline unblinding); ``None`` computes them in the step.
    """

    masks: MaskStream
    mask_std: float
    pool: MaskPool | None = None
    ocall: Ocall | None = None
    stats: OffloadStats = field(default_factory=OffloadStats)
    _last: _Masked | None = None
    _weights64: dict[str, torch.Tensor] = field(default_factory=dict)
    _layers: dict[str, OutsourcedLinear] = field(default_factory=dict)
    # Layers seen reading the same tensor right after a leader (q -> k, v; gate -> up): learned
    # from the first pass, then asked for in the leader's ocall, one round trip instead of three.
    _followers: dict[str, list[str]] = field(default_factory=dict)

    def take_stats(self) -> OffloadStats:
        """Return the counters gathered so far and start new ones."""
        stats, self.stats = self.stats, OffloadStats()
        return stats

    def forget(self) -> None:
        """Drop the cached masked input (call at the end of every enclave call)."""
        self._last = None

    def register(self, layer: OutsourcedLinear) -> None:
        """Know ``layer`` by its REE name (its answers may arrive in another layer's ocall)."""
        self._layers[layer.ree_name] = layer

    def _mask(self, x: torch.Tensor, method: str, names: list[str]) -> Blind:
        """A fresh mask for ``x``, read by the layers ``names`` through ``method``.

        Offline, ``z`` and the layers' factors are the pool's next rows (each row used once);
        online, ``z`` is drawn from the stream here and the factors are left to the unblinding.
        """
        start = time.perf_counter()
        # max|x| in one pass, no temporary (a NaN stays NaN and gets the fallback scale below)
        peak = float(torch.linalg.vector_norm(x.detach(), ord=math.inf)) if x.numel() else 0.0
        # A zero tensor still gets a full-size mask: the REE must not see which tensors are zero.
        scale = self.mask_std * (peak if peak > 0.0 and peak < float("inf") else 1.0)
        lead = x.shape[:-1]
        factors: dict[str, torch.Tensor] = {}
        if self.pool is None:
            z = self.masks.gaussian(tuple(x.shape)).z
        else:
            rows = self.pool.take(method, names, lead.numel())
            z = rows.z.view(x.shape)
            factors = {name: f.view(*lead, f.shape[-1]) for name, f in rows.factors.items()}
        z = z.to(x.device, WIRE_DTYPE)
        masked = torch.add(x.detach().to(WIRE_DTYPE), z, alpha=scale)
        self.stats.masks += 1
        self.stats.mask_s += time.perf_counter() - start
        return Blind(scale, z, masked, factors)

    def _unblind(
        self, layer: OutsourcedLinear, method: str, blind: Blind, answer: torch.Tensor
    ) -> torch.Tensor:
        """``answer - scale * factor``; the factor precomputed, or computed here from ``z``."""
        start = time.perf_counter()
        factor = blind.factors.get(layer.ree_name)
        if factor is None:
            weight = self._weight64(layer)
            z = blind.z
            factor = nn.functional.linear(z, weight) if method == LINEAR else z @ weight
            self.stats.factors_online += 1
        out = torch.sub(answer, factor.to(answer.device), alpha=blind.scale)
        self.stats.unblind_s += time.perf_counter() - start
        return out

    def _call(
        self, method: str, name: str, key: str, masked: torch.Tensor, also: list[str] | None = None
    ) -> list[torch.Tensor]:
        """Ocall ``method`` of layer ``name`` (and, for ``linear``, of ``also`` on the same input)."""
        if self.ocall is None:
            raise RuntimeError("an outsourced linear ran outside an enclave call (no ocall set)")
        start = time.perf_counter()
        meta: dict[str, Any] = {"name": name, "also": also} if also else {"name": name}
        _, answer = self.ocall(method, meta, {key: to_wire(masked)})
        self.stats.ocall_s += time.perf_counter() - start
        self.stats.ocalls += 1
        self.stats.bytes_sent += masked.numel() * masked.element_size()
        outs = []
        for i, layer_name in enumerate([name, *(also or [])]):
            out = answer.get(f"y{i}" if i else "y")
            if out is None or out.dtype != torch.int64:
                raise TamperedResultError(
                    f"the REE's answer to {method} of {layer_name} holds no int64 tensor"
                )
            outs.append(from_wire(out).to(masked.device))
        return outs

    def _verify(
        self, layer: OutsourcedLinear, method: str, sent: torch.Tensor, answer: torch.Tensor
    ) -> None:
        """Freivalds' check that ``answer`` is the product the REE was asked for, or raise.

        With a fresh secret Gaussian vector ``v`` (from the mask stream), a true answer satisfies
        ``answer v = sent (W^T v)`` (``linear``) or ``answer v = sent (W v)`` (``linear_t``), at a
        cost of two matrix-vector products instead of a matmul. A row changed by ``d`` passes only
        if ``|d . v|`` falls under the float64 rounding allowance, which for a random ``v`` the REE
        cannot arrange.
        """
        start = time.perf_counter()
        weight = self._weight64(layer)
        out_dim = weight.shape[0] if method == LINEAR else weight.shape[1]
        if answer.shape != (*sent.shape[:-1], out_dim):
            raise TamperedResultError(
                f"the REE's answer to {method} of {layer.ree_name} has shape "
                f"{tuple(answer.shape)}, not {(*sent.shape[:-1], out_dim)}"
            )
        if self.pool is not None:  # (v, W^T v) drawn and multiplied ahead of time
            v, u = (t.to(sent.device) for t in self.pool.check_pair(method, layer.ree_name))
        else:
            v = self.masks.gaussian((out_dim,)).z.to(sent.device)
            u = v @ weight if method == LINEAR else weight @ v  # W^T v, or W v
        gap = (answer @ v - sent @ u).abs()
        allowed = FREIVALDS_TOL * sent.norm(dim=-1) * u.norm()
        if not bool((gap <= allowed).all()):
            # (a diverged run, whose sent tensor is not finite, fails on its loss instead)
            if bool(torch.isfinite(sent).all()):
                raise TamperedResultError(
                    f"the REE's answer to {method} of {layer.ree_name} is not the product it was "
                    "asked for (Freivalds' check failed); the run stops rather than use it"
                )
        self.stats.verify_s += time.perf_counter() - start

    def forward(self, layer: OutsourcedLinear, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + b`` computed by the REE on ``x + r``; ``r`` removed here."""
        name, last = layer.ree_name, self._last
        if last is not None and last.source is x and last.version == x._version:
            # The same tensor as the previous layer's: same mask, never a second masking.
            blind, masked = last.blind, last.blind.masked
            y_masked = last.prefetched.pop(name, None)
            if y_masked is None:
                followers = self._followers.setdefault(last.leader, [])
                if name not in followers:
                    followers.append(name)
                    if self.pool is not None:  # its factors come with the leader's rows
                        self.pool.join(LINEAR, last.leader, name)
                y_masked = self._call(LINEAR, name, "x", masked)[0]
                self._verify(layer, LINEAR, masked, y_masked)
        else:
            also = self._followers.get(name, [])
            blind = self._mask(x, LINEAR, [name, *also])
            masked = blind.masked
            answers = self._call(LINEAR, name, "x", masked, also)
            for layer_name, answer in zip([name, *also], answers, strict=True):
                self._verify(self._layers[layer_name], LINEAR, masked, answer)
            y_masked = answers[0]
            prefetched = dict(zip(also, answers[1:], strict=True))
            self._last = _Masked(x, x._version, blind, name, prefetched)
        y = self._unblind(layer, LINEAR, blind, y_masked).to(x.dtype)
        return y + layer.bias if layer.bias is not None else y

    def backward(self, layer: OutsourcedLinear, g: torch.Tensor) -> torch.Tensor:
        """``g W`` computed by the REE on ``g + r``; ``r`` removed here."""
        self._last = None
        blind = self._mask(g, LINEAR_T, [layer.ree_name])
        gx_masked = self._call(LINEAR_T, layer.ree_name, "g", blind.masked)[0]
        self._verify(layer, LINEAR_T, blind.masked, gx_masked)
        return self._unblind(layer, LINEAR_T, blind, gx_masked).to(g.dtype)

    def weight64(self, name: str) -> torch.Tensor:
        """The float64 frozen weight of the outsourced layer ``name`` (for the mask pool)."""
        return self._weight64(self._layers[name])

    def _weight64(self, layer: OutsourcedLinear) -> torch.Tensor:
        weight = self._weights64.get(layer.ree_name)
        if weight is None:
            weight = layer.weight.detach().to(WIRE_DTYPE)
            self._weights64[layer.ree_name] = weight
        return weight


def to_wire(x: torch.Tensor) -> torch.Tensor:
    """A float64 tensor as its int64 bit pattern (process frames carry no float64; lossless)."""
    return x.contiguous().view(torch.int64)


def from_wire(x: torch.Tensor) -> torch.Tensor:
    """Undo :func:`to_wire`."""
    return x.contiguous().view(WIRE_DTYPE)


class _OutsourcedLinearFn(torch.autograd.Function):
    """Autograd node of an outsourced linear: only the input's gradient exists (W is frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: OutsourcedLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.offload.forward(layer, x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        layer: OutsourcedLinear = ctx.layer
        return layer.offload.backward(layer, g.contiguous()), None


class OutsourcedLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose matmuls the REE does on masked tensors.

    It keeps the original ``weight`` and ``bias`` parameters (frozen): the enclave needs ``W`` for
    the unblinding factors, and PEFT and ``state_dict`` see the same names as before.
    """

    def __init__(self, base: nn.Linear, ree_name: str, offload: LinearOffload) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.ree_name = ree_name
        self.offload = offload
        offload.register(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _OutsourcedLinearFn.apply(x, self)  # type: ignore[no-untyped-call]
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, outsourced as {self.ree_name!r}"


def frozen_linear_weights(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of a plain (not yet PEFT-wrapped) model, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def outsource_linears(model: nn.Module, offload: LinearOffload) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` with an :class:`OutsourcedLinear`, in place.

    Call it on the plain model, before PEFT attaches LoRA (PEFT then wraps the outsourced layers
    like any ``nn.Linear``). Returns the module paths, which are the names the REE serves.
    """
    names = list(frozen_linear_weights(model))
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(parent, child, OutsourcedLinear(base, name, offload))
    return names


class FrozenLinearServer:
    """The REE's side: frozen weights by module path, answering ``linear`` and ``linear_t``.

    It sees only masked tensors; it never receives an unmasked activation, gradient or adapter.

    Parameters
    ----------
    weights
        Module path -> weight ``(out_features, in_features)``, on the device the REE computes on.
    """

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights
        self.compute_s = 0.0

    @classmethod
    def from_model(cls, model: nn.Module) -> FrozenLinearServer:
        """Serve the linears of a plain model (biases stay with the enclave, which adds them)."""
        linears = frozen_linear_weights(model).items()
        return cls({name: m.weight.detach().to(WIRE_DTYPE) for name, m in linears})

    def __call__(
        self, method: str, meta: dict[str, Any], tensors: Tensors
    ) -> tuple[dict[str, Any], Tensors]:
        if method not in (LINEAR, LINEAR_T):
            raise ValueError(f"unknown ocall '{method}' (allowed: {LINEAR}, {LINEAR_T})")
        name = meta.get("name")
        also = meta.get("also", [])
        if not isinstance(also, list) or (also and method != LINEAR):
            raise ValueError(f"ocall {method}: 'also' must be a list of names, for linear only")
        names = [name, *also]
        found = [self.weights.get(n) for n in names if isinstance(n, str)]
        weights = [w for w in found if w is not None]
        if len(weights) != len(names):
            raise ValueError(f"ocall {method} names no frozen linear: {names!r}")
        weight = weights[0]
        key = "x" if method == LINEAR else "g"
        data = tensors.get(key)
        if data is None or data.ndim < 1 or data.dtype != torch.int64:
            raise ValueError(f"ocall {method} of {name} needs a float64 tensor '{key}' (as int64)")
        data = from_wire(data)
        for layer_name, w in zip(names, weights, strict=True):
            want = w.shape[1] if method == LINEAR else w.shape[0]
            if data.shape[-1] != want:
                raise ValueError(
                    f"ocall {method} of {layer_name}: last dimension {data.shape[-1]}, "
                    f"weight needs {want}"
                )
        start = time.perf_counter()
        data = data.to(weight.device, weight.dtype)
        answer: Tensors = {}
        with torch.no_grad():
            for i, w in enumerate(weights):
                out = nn.functional.linear(data, w) if method == LINEAR else data @ w
                answer[f"y{i}" if i else "y"] = to_wire(out.cpu())
        self.compute_s += time.perf_counter() - start
        return {}, answer
