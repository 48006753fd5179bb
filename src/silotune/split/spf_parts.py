"""SPF + LoRA in split mode: which side owns which SPF rows, and the SPF file of the saved adapter.

Where SPF rows live: each side attaches SPF deltas to its own decoder blocks only
(:func:`side_layers`): the silo to its head and tail blocks, the coordinator to the trunk blocks
(inside its enclave with ``split.trunk_in_enclave``). A block's rows depend only on that block's
frozen base weights (:func:`~silotune.adapters.spf.select_rows`), so each side selects exactly the
rows a centralized job selects for those blocks, without holding the other side's blocks (a lean
silo never loads the trunk).

The deltas are trainable parameters of the parts, so :class:`~silotune.split.parts.PartState`
moves them under their PEFT-style names (``base_model.model.model.layers.3.self_attn.k_proj.spf
.delta``) like LoRA tensors: the silos average theirs at every sync (plain or secure averaging),
the trunk keeps its own, and checkpoints save each side's deltas with its adapter. The rows never
travel during training (every side computes its own); at ``bye`` the trunk sends its rows
(``...spf.rows``, int64) with its adapter so the silo can write one complete
``spf_deltas.safetensors``; the silo checks them (sorted, distinct, in range, one per trained row,
every projection of the model present) before writing anything.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from silotune.adapters.spf import (
    SPF_FILE,
    SPFDelta,
    SPFFile,
    check_fits,
    check_rows,
    spf_deltas,
    spf_projections,
    unwrap,
    write_spf,
)
from silotune.config import SPFConfig
from silotune.errors import CheckpointError, ModelError

__all__ = [
    "SPF_DELTA",
    "SPF_ROWS",
    "is_spf_name",
    "side_layers",
    "complete_spf",
    "spf_rows_state",
    "split_off_spf",
    "write_split_spf",
]

SPF_DELTA = ".spf.delta"  # ends the name of an SPF delta in a part's state
SPF_ROWS = ".spf.rows"  # ends the name of its rows, sent by the trunk at bye
_PEFT_PREFIX = "base_model.model."


def side_layers(num_layers: int, head: int, tail: int, side: str) -> list[int]:
    """The decoder blocks ``side`` runs: ``silo`` head and tail, ``trunk`` the ones between."""
    if side == "silo":
        return [*range(head), *range(num_layers - tail, num_layers)]
    if side == "trunk":
        return list(range(head, num_layers - tail))
    raise ValueError(f"side must be 'silo' or 'trunk', got {side!r}")


def is_spf_name(name: str) -> bool:
    """Whether a state name is an SPF delta or its rows (not a PEFT tensor)."""
    return name.endswith((SPF_DELTA, SPF_ROWS))


def projection_name(name: str) -> str:
    """The transformers projection of an SPF state name (the key of the SPF file)."""
    stem = name.removesuffix(SPF_DELTA).removesuffix(SPF_ROWS).replace(".base_layer", "")
    return stem.removeprefix(_PEFT_PREFIX)


def spf_rows_state(model: nn.Module, parts: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """The rows of every SPF delta inside ``parts``, named like the deltas' state (``.spf.rows``)."""
    inside = {id(m) for part in parts for m in part.modules()}
    return {
        f"{name}.rows": module.rows.detach().cpu().clone()
        for name, module in model.named_modules()
        if isinstance(module, SPFDelta) and id(module) in inside
    }


def split_off_spf(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(PEFT tensors, SPF deltas and rows)`` of a split adapter state."""
    peft = {n: t for n, t in state.items() if not is_spf_name(n)}
    return peft, {n: t for n, t in state.items() if is_spf_name(n)}


def _whole_meta_model(model: nn.Module) -> nn.Module:
    """The whole base model on the meta device (shapes only, no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(unwrap(model).config))


def complete_spf(model: nn.Module, spf: Mapping[str, torch.Tensor], out: Path) -> SPFFile | None:
    """The SPF file of a split adapter: both sides' deltas, with this side's rows from ``model``.

    ``spf`` holds the deltas of every side and the trunk's rows (:func:`split_off_spf`). Returns
    None for a job without SPF. Raises ModelError, naming a projection, unless the deltas cover
    exactly the model's SPF projections with well-formed rows that fit the model's weights.
    """
    if not spf and not spf_deltas(model):
        return None
    values = {projection_name(n): t for n, t in spf.items() if n.endswith(SPF_DELTA)}
    rows = {projection_name(n): t for n, t in spf.items() if n.endswith(SPF_ROWS)}
    rows.update({name: delta.rows.cpu() for name, delta in spf_deltas(model).items()})
    ratios = dict(getattr(unwrap(model), "silotune_spf", {}))
    config = unwrap(model).config
    layers = range(config.num_hidden_layers)
    expected = spf_projections(config, SPFConfig(enabled=True, **ratios), layers)
    problems = sorted(set(expected) ^ set(values)) or sorted(set(values) - set(rows))
    if problems:
        raise ModelError(
            f"refusing to write SPF deltas to {out}: the silo's and the trunk's deltas do not "
            f"cover exactly this model's SPF projections with their rows (e.g. {problems[0]})"
        )
    try:
        for name in expected:
            check_rows(name, rows[name], values[name], out)
        ordered = SPFFile(
            {name: rows[name] for name in expected},
            {name: values[name] for name in expected},
            ratios,
        )
        check_fits(_whole_meta_model(model), ordered, out)
    except CheckpointError as err:
        raise ModelError(f"refusing to write SPF deltas: {err}") from None
    return ordered


def write_split_spf(spf_file: SPFFile | None, out_dir: Path) -> None:
    """Write ``spf_deltas.safetensors`` (None: remove a stale one, it would load onto LoRA)."""
    path = out_dir / SPF_FILE
    if spf_file is None:
        path.unlink(missing_ok=True)
        return
    write_spf(path, spf_file.rows, spf_file.values, spf_file.ratios)
