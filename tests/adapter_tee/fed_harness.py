"""Run a federated job with the silos' adapters in enclaves and record what crosses each boundary.

A :class:`Recorder` wraps a silo's enclave handle: every stage message going in, every reply
coming out, every ocall the enclave makes to its host and the host's answer. Everything the host
(the silo's REE) ever sees of its enclave is in that record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from silotune.adapter_tee.fed_host import train_federated_in_enclaves
from silotune.adapter_tee.fed_wire import decode_records
from silotune.adapter_tee.masked_linear import from_wire
from silotune.adapter_tee.runner import EnclaveCalls
from silotune.adapters.peft_adapters import read_adapter_dir
from silotune.config import JobConfig, config_from_dict
from silotune.enclave.base import OcallHandler, Tensors
from tests.federated.harness import run_in_process

FED_JOB = {
    "mode": "federated",
    "model": "tiny-llama",
    "adapter": {"type": "lora", "r": 4, "placement": "enclave"},
    "data": {"dataset": "fortunes-sample", "max_length": 64, "max_eval_examples": 8},
    "train": {"batch_size": 4, "lr": 5e-3, "seed": 0, "eval_batch_size": 8},
    "federation": {
        "silos": 2,
        "rounds": 2,
        "local_steps": 2,
        "min_silos": 2,
        "secure_aggregation": "masking",
    },
    "enclave": {"mask_std": 1e4},
}


def fed_job(tmp: Path, *overrides: str) -> JobConfig:
    return config_from_dict({**FED_JOB, "output_dir": str(tmp)}, list(overrides))


@dataclass
class Crossing:
    """One thing that crossed between a silo's host and its enclave."""

    partition: int
    kind: str  # "in" (stage message), "out" (its reply), "ocall" (to the host), "answer"
    name: str  # stage action or ocall name
    meta: dict[str, Any]
    values: Tensors

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array of it, as the host holds it (masked float64 ocall tensors decoded)."""
        if self.kind in ("in", "out"):
            body = decode_records(self.meta, self.values)
            return {
                f"{r}/{k}": a.numpy()
                for r, rec in body.array_records.items()
                for k, a in rec.items()
            }
        out = {}
        for key, value in self.values.items():
            if isinstance(value, torch.Tensor):
                t = from_wire(value) if value.dtype == torch.int64 else value
                out[key] = t.detach().double().numpy()
            else:
                out[key] = np.frombuffer(value, dtype=np.uint8)
        return out


@dataclass
class Recorder:
    """An enclave handle that records the traffic of every call (see the module docstring)."""

    partition: int
    inner: EnclaveCalls
    log: list[Crossing] = field(default_factory=list)
    tamper: Any = None  # (partition, action, meta, values) -> None, may edit the values in place

    @property
    def measurement(self) -> bytes:
        return self.inner.measurement

    def call(
        self,
        method: str,
        meta: dict[str, Any],
        tensors: Tensors,
        ocall: OcallHandler | None = None,
    ) -> tuple[dict[str, Any], Tensors]:
        assert ocall is not None
        p, action = self.partition, str(meta.get("action", method))
        if self.tamper is not None:
            self.tamper(p, action, meta, tensors)

        def spy(name: str, m: dict[str, Any], t: Tensors) -> tuple[dict[str, Any], Tensors]:
            self.log.append(Crossing(p, "ocall", name, m, dict(t)))
            answer = ocall(name, m, t)
            self.log.append(Crossing(p, "answer", name, *answer))
            return answer

        self.log.append(Crossing(p, "in", action, meta, dict(tensors)))
        out_meta, out_values = self.inner.call(method, meta, tensors, spy)
        reply = {k: v for k, v in out_meta.items() if k != "cost"}
        self.log.append(Crossing(p, "out", action, reply, dict(out_values)))
        return out_meta, out_values


def run_recorded(
    cfg: JobConfig, in_process: bool = True, tamper: Any = None
) -> tuple[dict[str, Any], list[Crossing]]:
    """Train ``cfg`` with the adapters in enclaves; (summary, everything that crossed)."""
    log: list[Crossing] = []

    def wrap(partition: int, enclave: EnclaveCalls) -> EnclaveCalls:
        return Recorder(partition, enclave, log, tamper)

    summary = train_federated_in_enclaves(
        cfg, overwrite=True, progress=False, wrap=wrap, in_process=in_process
    )
    return summary, log


def run_plain(cfg: JobConfig, out: Path) -> dict[str, Any]:
    """The same job with the adapters in the silos' hosts (the ordinary federated silo)."""
    plain = cfg.model_copy(deep=True)
    plain.adapter.placement = "ree"
    plain.output_dir = out
    summary, _, _ = run_in_process(plain)
    return summary


def adapter_gap(a: Path, b: Path) -> float:
    """Largest element difference between two saved PEFT adapters."""
    _, ta = read_adapter_dir(a / "adapter")
    _, tb = read_adapter_dir(b / "adapter")
    assert ta.keys() == tb.keys()
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


def max_abs_corr(values: np.ndarray, target: np.ndarray) -> float:
    """Largest |Pearson correlation| of ``target`` with any aligned ``target``-long window."""
    n = target.size
    with np.errstate(invalid="ignore", over="ignore"):  # random bytes read as floats: NaN, inf
        flat = np.nan_to_num(values.reshape(-1).astype(np.float64), posinf=0.0, neginf=0.0)
    best = 0.0
    for start in range(0, flat.size - n + 1, n):
        window = flat[start : start + n]
        if window.std() > 0:
            best = max(best, abs(float(np.corrcoef(window, target)[0, 1])))
    return best


def views(array: np.ndarray) -> list[np.ndarray]:
    """The readings a curious host would try: the array itself and its bytes as numbers."""
    raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
    out = [array.astype(np.float64)]
    usable = raw[: raw.size - raw.size % 4]
    out += [usable.view(np.float32), usable.view(np.int32)]
    return out
