"""Adapter in the TEE: the REE decodes the enclave's inputs from masked tensors, fresh vs reused masks.

Attacker
    The REE (the untrusted host that computes the frozen matmuls for the enclave).
Observes
    Every tensor the enclave sends it in one training step (``x + s * z`` per frozen linear input
    and output gradient), recorded at the ocall boundary by
    :func:`silotune.adapter_tee.masked_leakage.record_steps`.
Knows in advance
    The public base model (embeddings, first block's norm), ``enclave.mask_std``.
Attacks
    * ``fresh`` masks (the product): the nearest normalised embedding to each position of the
      first block's attention input (``masked_leakage``'s own attack, reused here).
    * ``reused`` mask (a test-only hook, :func:`reused_masks`; the product draws a fresh mask for
      every tensor and has no setting that reuses one): all tensors of one shape then share ``z``,
      ``y_i = x_i + s_i z``. The REE takes the top singular vector of the stacked ``y_i`` (the
      shared mask's direction), projects it out of the first block's input, and decodes the rest
      to the nearest normalised embedding.
Metric
    ``leakage`` = fraction of real tokens decoded right.
Chance
    Always guessing the batch's most frequent token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from silotune.adapter_tee.masked_leakage import (
    FIRST_INPUT,
    first_input_table,
    nearest_rows,
    record_steps,
    step_leakage,
    token_scores,
)
from silotune.adapter_tee.masked_linear import WIRE_DTYPE, Blind, LinearOffload
from silotune.config import JobConfig

__all__ = ["reused_masks", "run_tee", "tee_leakage"]


@contextlib.contextmanager
def reused_masks() -> Iterator[None]:
    """TEST-ONLY: make every :class:`LinearOffload` reuse one mask per tensor shape.

    This models the known pitfall (a one-time pad used twice) to measure what it would cost; it
    patches the class only inside the ``with`` block and no config reaches it.
    """
    original = LinearOffload._mask
    drawn: dict[tuple[int, ...], torch.Tensor] = {}

    def reuse(self: LinearOffload, x: torch.Tensor, method: str, names: list[str]) -> Blind:
        shape = tuple(x.shape)
        if shape not in drawn:
            blind = original(self, x, method, names)
            drawn[shape] = blind.z
            return blind
        z = drawn[shape]
        peak = float(x.detach().abs().max()) if x.numel() else 0.0
        scale = self.mask_std * (peak if 0.0 < peak < float("inf") else 1.0)
        # No precomputed factors: the unblinding computes them from the reused z.
        return Blind(scale, z, x.detach().to(WIRE_DTYPE) + scale * z, {})

    LinearOffload._mask = reuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        LinearOffload._mask = original  # type: ignore[method-assign]


def _strip_shared_mask(received: dict[tuple[str, str], torch.Tensor]) -> torch.Tensor:
    """The first block's input with the direction shared by all same-shape tensors removed."""
    first = received[("linear", FIRST_INPUT)]
    same = [t for t in received.values() if t.shape == first.shape]
    stacked = torch.stack([t.flatten().double() for t in same])  # (N, D)
    _, _, vh = torch.linalg.svd(stacked, full_matrices=False)
    u = vh[0]  # (D,), the shared mask's direction
    flat = first.flatten().double()
    return (flat - (flat @ u) * u).reshape(first.shape)


def tee_leakage(cfg_dict: dict[str, Any], mask_std: float, reuse: bool) -> dict[str, float]:
    """Token recovery by the REE in one step at ``mask_std``, with fresh or reused masks."""
    if not reuse:
        row = step_leakage(cfg_dict, mask_std)
        return {"leakage": row["token_recovery"], "chance": row["token_chance"]}
    with reused_masks():
        (view,), ree = record_steps(cfg_dict, mask_std, 1)
    table = first_input_table(ree.model)
    naive, chance = token_scores(
        nearest_rows(view.received[("linear", FIRST_INPUT)], table), view.batch
    )
    hits, _ = token_scores(nearest_rows(_strip_shared_mask(view.received), table), view.batch)
    return {"leakage": hits, "chance": chance, "naive_leakage": naive}


def tee_job(cfg: JobConfig) -> dict[str, Any]:
    """The centralized adapter-in-TEE job matching ``cfg``'s model, adapter and data."""
    data = cfg.model_dump(mode="json")
    keep = ("model", "adapter", "data", "train", "enclave")
    return {"mode": "centralized", **{k: data[k] for k in keep}}


def run_tee(cfg: JobConfig, mask_stds: tuple[float, ...] = (1.0, 1e4)) -> dict[str, Any]:
    """Result rows for ``silotune attack tee-masks``: fresh and reused masks at each ``mask_std``."""
    job = tee_job(cfg)
    rows = []
    for mask_std in mask_stds:
        for reuse in (False, True):
            result = tee_leakage(job, mask_std, reuse)
            setting = {"model": cfg.model.name, "mask_std": mask_std, "reused_mask": reuse}
            rows.append({"setting": setting, **result, "cost": {}})
    return {"rows": rows}
