"""The adapter app's training state as one byte string for sealing: adapter, AdamW, schedule, RNG.

Layout: an 8-byte big-endian length, that many bytes of JSON (format version, step, the optimizer's
param groups, the scheduler's state), then safetensors bytes holding the adapter (``adapter/NAME``),
the AdamW moments and step counts (``adam/INDEX/KEY``) and the torch RNG state (``rng``). Only
the enclave reads it, after unsealing (which authenticates it); no pickle is involved.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from silotune.adapters.peft_adapters import adapter_state, set_adapter_state
from silotune.errors import CheckpointError

__all__ = ["STATE_LABEL", "pack_state", "unpack_state"]

STATE_LABEL = "silotune/adapter-app/state/v1"  # the sealing label: opens as nothing else
_VERSION = 1


def pack_state(
    step: int,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng: torch.Tensor,
) -> bytes:
    """Serialise everything a resumed enclave needs to continue at ``step`` exactly."""
    tensors = {f"adapter/{k}": v.contiguous() for k, v in adapter_state(model).items()}
    opt = optimizer.state_dict()
    for index, slots in opt["state"].items():
        for key, value in slots.items():
            tensors[f"adam/{index}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng"] = rng
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {
        "version": _VERSION,
        "step": step,
        "param_groups": opt["param_groups"],
        "scheduler": sched,
    }
    head = json.dumps(meta).encode("utf-8")
    return struct.pack(">Q", len(head)) + head + save_tensors(tensors)


def unpack_state(
    data: bytes,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[int, torch.Tensor]:
    """Load a packed state into ``model``, ``optimizer`` and ``scheduler``; returns (step, rng).

    Raises
    ------
    CheckpointError
        If the state is malformed or does not fit this adapter and optimizer.
    """
    try:
        (length,) = struct.unpack(">Q", data[:8])
        meta = json.loads(data[8 : 8 + length].decode("utf-8"))
        tensors = load_tensors(data[8 + length :])
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"the enclave's sealed state is malformed: {err}") from None
    if not isinstance(meta, dict) or meta.get("version") != _VERSION:
        raise CheckpointError(
            f"the enclave's sealed state has an unknown version (want {_VERSION})"
        )
    prefix = "adapter/"
    set_adapter_state(
        model, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    )
    slots: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("adam/"):
            _, index, name = key.split("/", 2)
            slots.setdefault(int(index), {})[name] = value
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])  # JSON turned the tuple into a list
    try:
        optimizer.load_state_dict({"state": slots, "param_groups": groups})
        scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(groups)})
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"the enclave's sealed state does not fit this job: {err}") from None
    return int(meta["step"]), tensors["rng"]
