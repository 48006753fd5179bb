"""Measure what the REE can learn from masked tensors, and what the masks cost in accuracy.

For a recipe and a list of ``enclave.mask_std`` values, :func:`measure_leakage` runs one training
step of the adapter app in process with a recording REE and compares every tensor the REE
received with the clear tensor the enclave masked:

* ``max_abs_corr`` / ``median_abs_corr``: the correlation between a clear tensor and what the REE
  received, over all tensors of the step. The best linear estimate ``a * y + b`` of ``x`` from the
  received ``y`` (fitted with the truth, so an upper bound on what a linear REE achieves) has
  relative error ``sqrt(1 - corr**2)``; ``min_linear_rel_err`` reports its smallest value.
* ``token_recovery``: a concrete attack. The first block's attention input is
  ``RMSNorm(embedding[token])``, a function of the public weights and the secret token only, so
  the REE decodes each position to the vocabulary entry nearest to what it received (maximum
  likelihood under Gaussian masks) and this reports the fraction of real tokens it gets right,
  next to ``token_chance``, the fraction that always guessing the most frequent token would get.
* ``max_abs_diff``: the adapter difference to the plain trainer after ``steps`` steps
  (:func:`~silotune.adapter_tee.runner.compare_with_plain`), the accuracy cost.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from silotune.adapter_tee.app import enclave_app_config
from silotune.adapter_tee.masked_linear import FrozenLinearServer, OutsourcedLinear, from_wire
from silotune.adapter_tee.runner import LocalEnclave, compare_with_plain, load_ree_model
from silotune.adapters.peft_adapters import adapter_state
from silotune.config import config_from_dict
from silotune.models.loading import LoadedModel

__all__ = [
    "StepView",
    "first_input_table",
    "measure_leakage",
    "nearest_rows",
    "record_steps",
    "step_leakage",
    "token_scores",
]

Tensors = dict[str, torch.Tensor]
FIRST_INPUT = "model.layers.0.self_attn.q_proj"


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    a = x.double().flatten() - x.double().mean()
    b = y.double().flatten() - y.double().mean()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


def _record_clear(model: torch.nn.Module) -> dict[tuple[str, str], torch.Tensor]:
    """Hooks that keep, per outsourced linear, the clear input and output gradient it masks."""
    clear: dict[tuple[str, str], torch.Tensor] = {}

    def keep(key: tuple[str, str]) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: Any, outputs: Any) -> None:
            clear[key] = (inputs[0] if key[0] == "linear" else outputs[0]).detach()

        return hook

    for module in model.modules():
        if isinstance(module, OutsourcedLinear):
            module.register_forward_hook(keep(("linear", module.ree_name)))
            module.register_full_backward_hook(keep(("linear_t", module.ree_name)))
    return clear


@dataclass
class StepView:
    """One training step as the REE saw it, and the truth kept beside it only for scoring.

    ``received``: every tensor the REE was sent, by (ocall, layer name); ``clear``: the clear
    tensor each one masked (if asked for); ``batch``: the step's batch; ``adapter``: the enclave's
    adapter tensors (PEFT names) during this step's forward, before its update.
    """

    received: dict[tuple[str, str], torch.Tensor]
    clear: dict[tuple[str, str], torch.Tensor]
    batch: dict[str, torch.Tensor]
    adapter: dict[str, torch.Tensor]


def record_steps(
    cfg_dict: dict[str, Any],
    mask_std: float,
    steps: int,
    record_from: int = 0,
    keep_clear: bool = False,
) -> tuple[list[StepView], LoadedModel]:
    """Run ``steps`` training steps of the adapter app in process with a recording REE.

    Returns the :class:`StepView` of every step from ``record_from`` on, and the REE's own frozen
    model (what it holds in advance). ``train.max_steps`` is raised to ``steps`` if lower.
    """
    overrides = ["adapter.placement=enclave", f"enclave.mask_std={mask_std}", "model.device=cpu"]
    cfg = config_from_dict(cfg_dict, overrides)
    if cfg.train.max_steps < steps:
        cfg = config_from_dict(cfg_dict, [*overrides, f"train.max_steps={steps}"])
    ree = load_ree_model(cfg)
    server = FrozenLinearServer.from_model(ree.model)
    enclave = LocalEnclave(enclave_app_config(cfg))
    clear = _record_clear(enclave.app.model) if keep_clear else {}
    views = []
    for step in range(steps):
        received: dict[tuple[str, str], torch.Tensor] = {}

        def recording_ree(
            method: str, meta: dict[str, Any], tensors: Tensors, received: Any = received
        ) -> tuple[Any, Tensors]:
            for tensor in tensors.values():
                received[(method, str(meta["name"]))] = from_wire(tensor).clone()
            return server(method, meta, tensors)

        adapter = adapter_state(enclave.app.model) if step >= record_from else {}
        batch = enclave.app.stream.micro_batch(step)
        enclave.call("train_step", {"step": step}, {}, recording_ree)
        if step >= record_from:
            views.append(StepView(received, dict(clear), batch, adapter))
    return views, ree


def first_input_table(model: torch.nn.Module) -> torch.Tensor:
    """``RMSNorm(embedding)`` of every vocabulary entry: the first block's possible inputs (V, C)."""
    with torch.no_grad():
        base = model.model
        return base.layers[0].input_layernorm(base.embed_tokens.weight).double()


def nearest_rows(seen: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the ``table`` row nearest to each vector of ``seen`` (..., C) -> (...)."""
    scores = seen.double() @ table.T - 0.5 * (table * table).sum(-1)  # argmax = nearest entry
    return scores.argmax(-1)


def token_scores(guess: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(fraction of real tokens guessed right, always guessing the most frequent token)."""
    real = batch["attention_mask"].bool()
    tokens = batch["input_ids"][real]
    hits = float((guess[real] == tokens).double().mean())
    return hits, Counter(tokens.tolist()).most_common(1)[0][1] / tokens.numel()


def step_leakage(cfg_dict: dict[str, Any], mask_std: float) -> dict[str, float]:
    """Correlation and token-recovery numbers of one training step at ``mask_std`` (see module)."""
    (view,), ree = record_steps(cfg_dict, mask_std, 1, keep_clear=True)
    received, batch = view.received, view.batch
    corrs = [abs(_corr(view.clear[key], received[key])) for key in received]
    # The attack: nearest normalised embedding to each received first-block input.
    guess = nearest_rows(received[("linear", FIRST_INPUT)], first_input_table(ree.model))
    hits, chance = token_scores(guess, batch)
    return {
        "mask_std": mask_std,
        "tensors": len(corrs),
        "max_abs_corr": max(corrs),
        "median_abs_corr": statistics.median(corrs),
        "min_linear_rel_err": math.sqrt(max(0.0, 1.0 - max(corrs) ** 2)),
        "token_recovery": hits,
        "token_chance": chance,
    }


def measure_leakage(
    cfg_dict: dict[str, Any], mask_stds: list[float], steps: int = 10
) -> list[dict[str, float]]:
    """One row per ``mask_std``: :func:`step_leakage` plus the adapter difference after ``steps``."""
    rows = []
    for mask_std in mask_stds:
        row = step_leakage(cfg_dict, mask_std)
        job = {**cfg_dict, "enclave": {**cfg_dict.get("enclave", {}), "mask_std": mask_std}}
        compared = compare_with_plain(job, steps, in_process=True)
        row["max_abs_diff"] = compared["max_abs_diff"]
        row["max_loss_diff"] = compared["max_loss_diff"]
        rows.append(row)
    return rows
