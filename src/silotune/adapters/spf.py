"""Sparsification Parameter Fine-tuning (SPF): train the top-L1 heads and FFN rows of frozen weights.

SPF picks, in every decoder block, the attention heads of Q, K and V and the FFN neurons whose
weight rows have the largest L1 norm, and trains those rows of the base weights; LoRA trains the
other projections (see docs/spf.md). The pick depends only on the frozen base weights, so every
silo of a federation computes the same one without talking.

The base weight itself is never touched. Each chosen projection gets a child module ``spf`` that
holds the sorted chosen rows (k,) and a trainable delta (k, in), initialised to zero, and a forward
hook that adds ``x @ delta.T`` to the chosen output features. That is exactly a forward pass with
weight ``W + scatter(rows, delta)``, i.e. full fine-tuning of those rows with the gradient of every
other row masked to zero, but AdamW's moments and weight decay only ever see the chosen rows (decay
pulls them towards the base weights, as it pulls LoRA towards the base model).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from silotune.config import SPFConfig
from silotune.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

SPF_FILE = "spf_deltas.safetensors"
SPF_FORMAT = "silotune-spf"
SPF_VERSION = "1"
CHILD = "spf"  # name of the delta module under each chosen projection

LLAMA_LIKE = ("llama", "qwen2", "mistral")
SUPPORTED = (*LLAMA_LIKE, "gpt2")

# LoRA targets when SPF is on: the block's projections SPF does not train (attention output and
# FFN down projection), so every linear map of a block is adapted by exactly one method.
SPF_LORA_TARGETS: dict[str, list[str]] = {
    **{kind: ["o_proj", "down_proj"] for kind in LLAMA_LIKE},
    # GPT-2 names both output projections c_proj; PEFT matches the dotted suffixes.
    "gpt2": ["attn.c_proj", "mlp.c_proj"],
}


@dataclass(frozen=True)
class Block:
    """``units`` consecutive groups of ``size`` output rows from row ``offset`` (heads, neurons)."""

    offset: int
    units: int
    size: int
    ratio: float


@dataclass(frozen=True)
class Rule:
    """How one projection of a decoder block is selected.

    ``blocks`` are ranked separately (Q, K and V of GPT-2's fused c_attn are three blocks);
    ``same_as`` names the projection of the block whose selection this one reuses instead.
    """

    suffix: str
    blocks: tuple[Block, ...] = ()
    same_as: str | None = None


def kept_units(ratio: float, units: int) -> int:
    """How many of ``units`` a ratio keeps: ceil(ratio * units), at least 1, at most ``units``.

    The product is rounded to 9 decimals first, so 0.1 * 30 (3.0000000000000004 in floating
    point) keeps 3, not 4.
    """
    return max(1, min(units, math.ceil(round(ratio * units, 9))))


def _rules(config: object, cfg: SPFConfig) -> tuple[str, list[Rule]]:
    """The layer-name template and the per-block selection rules of an architecture."""
    kind = getattr(config, "model_type", None)
    if kind in LLAMA_LIKE:
        heads = config.num_attention_heads  # type: ignore[attr-defined]
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // heads  # type: ignore[attr-defined]
        ffn = config.intermediate_size  # type: ignore[attr-defined]
        return "model.layers.{}.", [
            Rule("self_attn.q_proj", (Block(0, heads, dim, cfg.head_ratio),)),
            Rule("self_attn.k_proj", (Block(0, kv_heads, dim, cfg.head_ratio),)),  # GQA
            Rule("self_attn.v_proj", (Block(0, kv_heads, dim, cfg.head_ratio),)),
            Rule("mlp.up_proj", (Block(0, ffn, 1, cfg.ffn_ratio),)),
            Rule("mlp.gate_proj", same_as="mlp.up_proj"),  # a SwiGLU neuron is a gate/up pair
        ]
    if kind == "gpt2":
        hidden, heads = config.n_embd, config.n_head  # type: ignore[attr-defined]
        dim = hidden // heads
        ffn = getattr(config, "n_inner", None) or 4 * hidden
        qkv = tuple(Block(part * hidden, heads, dim, cfg.head_ratio) for part in range(3))
        return "transformer.h.{}.", [
            Rule("attn.c_attn", qkv),  # fused [Q; K; V] output features
            Rule("mlp.c_fc", (Block(0, ffn, 1, cfg.ffn_ratio),)),
        ]
    raise ConfigError(
        f"adapter.spf supports model types {', '.join(SUPPORTED)}; this model is '{kind}'"
    )


def spf_lora_targets(model: nn.Module) -> list[str]:
    """Default LoRA targets next to SPF: the projections SPF does not train."""
    kind = getattr(model.config, "model_type", None)
    if kind not in SPF_LORA_TARGETS:
        raise ConfigError(
            f"adapter.spf supports model types {', '.join(SUPPORTED)}; this model is '{kind}'"
        )
    return list(SPF_LORA_TARGETS[kind])


def _base_layer(module: nn.Module) -> nn.Module:
    """The plain Linear/Conv1D under a PEFT LoRA wrapper (or the module itself)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def weight_rows(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (out_features, in_features): nn.Linear as is, GPT-2's Conv1D transposed."""
    if isinstance(layer, Conv1D):
        return layer.weight.t()
    if isinstance(layer, nn.Linear):
        return layer.weight
    raise ConfigError(
        f"SPF can train nn.Linear and GPT-2 Conv1D layers, not {type(layer).__name__}"
    )


def _rank(weight: torch.Tensor, block: Block) -> torch.Tensor:
    """Sorted output rows of the top-L1 units of one block."""
    rows = weight[block.offset : block.offset + block.units * block.size]
    # Every silo must pick the same rows without talking. Rank the weights rounded to bfloat16
    # (a silo that loaded the model in bf16 holds exactly those values, one in fp32 rounds to
    # them here) and sum in float64 on the CPU, in one fixed order.
    exact = rows.detach().to("cpu").to(torch.bfloat16).to(torch.float64)
    norms = exact.abs().reshape(block.units, -1).sum(dim=1)
    order = torch.argsort(-norms, stable=True)  # ties go to the lower unit index
    units = order[: kept_units(block.ratio, block.units)]
    starts = block.offset + units * block.size
    picked = (starts.unsqueeze(1) + torch.arange(block.size)).reshape(-1)
    return torch.sort(picked).values


def spf_projections(config: object, cfg: SPFConfig, layers: Iterable[int]) -> list[str]:
    """Names of the projections SPF trains in ``layers`` (model order), from the config alone."""
    template, rules = _rules(config, cfg)
    return [template.format(layer) + rule.suffix for layer in layers for rule in rules]


def select_rows(
    model: nn.Module, cfg: SPFConfig, layers: Iterable[int] | None = None
) -> dict[str, torch.Tensor]:
    """The rows SPF trains: projection name -> sorted int64 output rows (k,), in model order.

    Parameters
    ----------
    model : nn.Module
        A Hugging Face causal LM (optionally with LoRA layers injected; their base layers count).
    cfg : SPFConfig
        The ratios of heads and FFN neurons kept.
    layers : iterable of int, optional
        Only these decoder blocks (default: all). A block's rows depend on its own weights only,
        so each side of a split model selects its blocks' rows without holding the others.
    """
    model = unwrap(model)
    template, rules = _rules(model.config, cfg)
    chosen: dict[str, torch.Tensor] = {}
    if layers is None:
        layers = range(model.config.num_hidden_layers)
    for layer in sorted(layers):
        prefix = template.format(layer)
        for rule in rules:
            name = prefix + rule.suffix
            if rule.same_as is not None:
                chosen[name] = chosen[prefix + rule.same_as].clone()
                continue
            weight = weight_rows(_base_layer(model.get_submodule(name)))
            chosen[name] = torch.cat([_rank(weight, block) for block in rule.blocks])
    return chosen


class SPFDelta(nn.Module):
    """Trainable values of the chosen rows of one frozen projection, added by a forward hook."""

    rows: torch.Tensor  # (k,) sorted output rows, a non-persistent buffer

    def __init__(
        self, rows: torch.Tensor, in_features: int, device: torch.device, lr: float | None = None
    ) -> None:
        super().__init__()
        self.lr = lr  # its own learning rate (adapter.spf.lr), None = the job's
        self.register_buffer("rows", rows.to(device=device, dtype=torch.long), persistent=False)
        # float32 whatever the base dtype, as PEFT keeps LoRA weights; zero = the base model.
        self.delta = nn.Parameter(torch.zeros(rows.numel(), in_features, device=device))

    def hook(
        self, layer: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        """Forward hook of the projection: output[..., rows] += x @ delta.T."""
        x = args[0]  # (..., in)
        extra = nn.functional.linear(x.to(self.delta.dtype), self.delta)  # (..., k)
        return output.index_add(-1, self.rows, extra.to(output.dtype))  # (..., out)

    def extra_repr(self) -> str:
        return f"rows={self.rows.numel()}, in_features={self.delta.shape[1]}"


def attach_rows(
    model: nn.Module,
    rows: dict[str, torch.Tensor],
    trainable: bool = True,
    lr: float | None = None,
) -> dict[str, SPFDelta]:
    """Give each named projection of ``model`` a zero delta on ``rows`` (after LoRA is attached)."""
    deltas, model = {}, unwrap(model)
    for name, picked in rows.items():
        layer = _base_layer(model.get_submodule(name))
        if hasattr(layer, CHILD):
            raise ConfigError(f"{name} already has SPF deltas attached")
        weight = weight_rows(layer)
        delta = SPFDelta(picked, weight.shape[1], weight.device, lr)
        delta.delta.requires_grad_(trainable)
        layer.add_module(CHILD, delta)
        layer.register_forward_hook(delta.hook)
        deltas[name] = delta
    return deltas


def attach_spf(
    model: nn.Module, cfg: SPFConfig, layers: Iterable[int] | None = None
) -> dict[str, SPFDelta]:
    """Select rows from the frozen base weights and attach trainable zero deltas to them.

    ``layers`` limits both to those decoder blocks (a split side's own blocks; default all).
    """
    model = unwrap(model)
    deltas = attach_rows(model, select_rows(model, cfg, layers), lr=cfg.lr)
    model.silotune_spf = {"head_ratio": cfg.head_ratio, "ffn_ratio": cfg.ffn_ratio}
    count = sum(d.delta.numel() for d in deltas.values())
    log.info("SPF: training %d parameters in %d projections", count, len(deltas))
    return deltas


def spf_deltas(model: nn.Module) -> dict[str, SPFDelta]:
    """The SPF delta modules of a model (PEFT-wrapped or not): projection name -> module."""
    found = {}
    for name, module in _named(model):
        if isinstance(module, SPFDelta):
            owner = name.rsplit(".", 1)[0]
            found[owner.replace(".base_layer", "")] = module
    return found


def _named(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Module names relative to the transformers model, also for a PeftModel."""
    return unwrap(model).named_modules()


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (LoRA layers injected), or ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """(out, in) weight the projection computes with: base rows plus the SPF delta, detached."""
    base = _base_layer(layer)
    weight = weight_rows(base).detach().float().clone()
    if hasattr(base, CHILD):
        delta = getattr(base, CHILD)
        weight.index_add_(0, delta.rows, delta.delta.detach().float())
    return weight


def fold_spf(model: torch.nn.Module) -> int:
    """Add each SPF delta to its base weight rows and remove the delta and its hook.

    Returns the number of projections folded (0 for an adapter without SPF rows).
    """
    deltas = spf_deltas(model)
    base = unwrap(model)
    for name, delta in deltas.items():
        layer = _base_layer(base.get_submodule(name))
        weight = weight_rows(layer)  # a view of layer.weight, (out, in)
        with torch.no_grad():
            weight.index_add_(0, delta.rows, delta.delta.detach().to(weight.dtype))
        for key, hook in list(layer._forward_hooks.items()):
            if hook == delta.hook:
                del layer._forward_hooks[key]
        delattr(layer, CHILD)
    return len(deltas)


# ------------------------------------------------------------------------------ files


def save_spf(model: nn.Module, out_dir: Path) -> bool:
    """Write ``spf_deltas.safetensors`` (rows and values per projection); False if no SPF."""
    deltas = spf_deltas(model)
    path = out_dir / SPF_FILE
    if not deltas:
        path.unlink(missing_ok=True)  # a stale file would be applied to a LoRA-only adapter
        return False
    rows = {name: delta.rows for name, delta in deltas.items()}
    values = {name: delta.delta for name, delta in deltas.items()}
    write_spf(path, rows, values, getattr(unwrap(model), "silotune_spf", {}))
    return True


def write_spf(
    path: Path,
    rows: dict[str, torch.Tensor],
    values: dict[str, torch.Tensor],
    ratios: dict[str, float],
) -> None:
    """Write an SPF file: per projection name, ``.rows`` (k,) int64 and ``.delta`` (k, in) fp32."""
    tensors = {}
    for name in rows:
        tensors[f"{name}.rows"] = rows[name].detach().long().cpu().contiguous()
        tensors[f"{name}.delta"] = values[name].detach().float().cpu().contiguous()
    meta = {"format": SPF_FORMAT, "version": SPF_VERSION, "ratios": json.dumps(ratios)}
    save_file(tensors, path, metadata=meta)


@dataclass
class SPFFile:
    """A read and checked ``spf_deltas.safetensors``: rows (k,) and values (k, in) per projection."""

    rows: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    ratios: dict[str, float]


def read_spf(path: Path) -> SPFFile:
    """Read an SPF file, with one clear CheckpointError if it is not a well-formed one."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own SafetensorError for corrupt files
        raise CheckpointError(f"{path} is corrupt or not safetensors: {err}") from None
    if meta.get("format") != SPF_FORMAT or meta.get("version") != SPF_VERSION:
        raise CheckpointError(f"{path} is not a version-{SPF_VERSION} silotune SPF file")
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    rows, values = {}, {}
    for name in names:
        r, v = tensors.get(f"{name}.rows"), tensors.get(f"{name}.delta")
        if r is None or v is None or len(tensors) != 2 * len(names):
            raise CheckpointError(f"{path}: every projection needs exactly .rows and .delta")
        check_rows(name, r, v, path)
        rows[name], values[name] = r, v
    try:
        ratios = json.loads(meta.get("ratios", "{}"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its ratios metadata is not JSON") from None
    return SPFFile(rows, values, ratios)


def check_rows(name: str, rows: torch.Tensor, values: torch.Tensor, where: Path) -> None:
    """Rows (k,) are sorted, distinct, non-negative int64 indices for values (k, in)."""
    r, v = rows, values
    if r.dtype != torch.long or r.ndim != 1 or v.ndim != 2 or v.shape[0] != r.numel():
        raise CheckpointError(
            f"{where}: {name} has rows {tuple(r.shape)} for values "
            f"{tuple(v.shape)}; want (k,) int64 and (k, in)"
        )
    if r.numel() == 0 or int(r[0]) < 0 or (r.numel() > 1 and not bool((r.diff() > 0).all())):
        raise CheckpointError(
            f"{where}: the rows of {name} are not sorted, distinct, non-negative indices"
        )


def check_fits(model: nn.Module, spf: SPFFile, where: Path) -> None:
    """Each projection exists in ``model`` and its rows and width fit the base weight."""
    base = unwrap(model)
    for name, r in spf.rows.items():
        try:
            weight = weight_rows(_base_layer(base.get_submodule(name)))
        except AttributeError:
            raise CheckpointError(
                f"SPF deltas in {where} are for a projection {name} this model lacks"
            ) from None
        out, width = weight.shape
        if int(r[-1]) >= out or spf.values[name].shape[1] != width:
            raise CheckpointError(
                f"SPF deltas in {where} do not fit {name}: rows up to {int(r[-1])} of width "
                f"{spf.values[name].shape[1]}, the model's weight is {out} x {width}"
            )


def load_spf(model: nn.Module, adapter_dir: Path, trainable: bool = False) -> bool:
    """Attach the deltas saved in ``adapter_dir`` to ``model`` (saved rows); False if none saved."""
    path = adapter_dir / SPF_FILE
    if not path.is_file():
        return False
    spf = read_spf(path)
    check_fits(model, spf, adapter_dir)
    base = unwrap(model)
    deltas = attach_rows(base, spf.rows, trainable)
    with torch.no_grad():
        for name, delta in deltas.items():
            delta.delta.copy_(spf.values[name].to(delta.delta.device))
    base.silotune_spf = spf.ratios
    return True


def restore_spf(model: nn.Module, folder: Path) -> None:
    """Copy saved delta values into a job's SPF deltas (resume); the selections must match."""
    deltas, path = spf_deltas(model), folder / SPF_FILE
    if not deltas:
        if path.is_file():
            raise CheckpointError(f"{folder} holds SPF deltas but this job has adapter.spf off")
        return
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {SPF_FILE} but this job trains SPF deltas")
    spf = read_spf(path)
    if set(spf.rows) != set(deltas):
        raise CheckpointError(f"{path} holds deltas for other projections than this job's")
    for name, delta in deltas.items():
        same_shape = spf.values[name].shape == delta.delta.shape
        if not (same_shape and torch.equal(spf.rows[name], delta.rows.cpu())):
            raise CheckpointError(
                f"{path}: the rows of {name} differ from this job's selection (another base "
                "model or other adapter.spf ratios)"
            )
    with torch.no_grad():
        for name, delta in deltas.items():
            delta.delta.copy_(spf.values[name].to(delta.delta.device))
