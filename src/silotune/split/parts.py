"""Build the silo's and the coordinator's halves of a split model and move adapter tensors in and out.

Both sides load the same base model and attach the same seeded adapter (so the adapter starts
where the centralized trainer's would), then cut it with :func:`~silotune.models.slicing.split_model`.
Each side then drops the blocks it does not run: the silo keeps embeddings, head and tail, the
coordinator keeps the trunk. A silo loading a Llama-family safetensors folder (SmolLM2 included)
never reads the trunk's weights at all (:func:`_load_silo_lean`); its LoRA tensors are then drawn
from the same distribution but not the same numbers as the centralized trainer's. Adapter tensors travel under their PEFT names
(``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``), so a silo's tensors plus the
coordinator's form a complete PEFT adapter. A prefix adapter is cut by layer instead
(:mod:`silotune.split.prefix`): each side's parts own their layers' prefix, named
``prefix.layers.<i>``, and :func:`save_full_adapter` stacks them into PEFT's ``prompt_embeddings``.
"""

from __future__ import annotations

import copy
import gc
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from silotune.adapters.peft_adapters import ADAPTER_WEIGHTS, attach_adapter
from silotune.config import JobConfig
from silotune.errors import ConfigError, ModelError
from silotune.models.loading import (
    LoadedModel,
    _ensure_pad_token,
    load_model,
    resolve_device,
    resolve_dtype,
    set_gradient_checkpointing,
)
from silotune.models.presets import smollm2_folder
from silotune.models.slicing import SplitPart, SplitParts, split_model
from silotune.split.prefix import (
    PrefixedPart,
    assemble_prompt_embeddings,
    is_prefix_state,
    prefix_embedding,
)
from silotune.split.spf_parts import complete_spf, side_layers, split_off_spf, write_split_spf

__all__ = [
    "ModelHalf",
    "PartState",
    "build_half",
    "check_split_config",
    "save_full_adapter",
]


class _Absent(nn.Module):
    """Stands in for a block this side does not run (keeps the other blocks' indices and names)."""

    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("this block runs on the other side of the split")


def check_split_config(cfg: JobConfig) -> None:
    """Reject what split training does not support, with one sentence naming the key."""
    if cfg.adapter.type not in ("lora", "prefix"):
        raise ConfigError(
            f"mode split trains LoRA or prefix adapters (adapter.type: lora or prefix), got "
            f"'{cfg.adapter.type}'"
        )
    if cfg.data.task not in ("classification", "instruction"):
        raise ConfigError(
            f"mode split supports data.task classification or instruction, got '{cfg.data.task}'"
        )


class PartState:
    """Read and write the trainable tensors of split parts under their PEFT names.

    Parameters
    ----------
    model
        The PEFT model the parts were cut from.
    parts
        The parts whose trainable parameters this object covers.
    """

    def __init__(self, model: PeftModel, parts: Sequence[nn.Module]) -> None:
        full = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
        adapter = f".{model.active_adapter}."
        self.names: list[tuple[int, str, str]] = []  # (part index, local name, PEFT name)
        for index, part in enumerate(parts):
            prefix_names = part.state_names() if isinstance(part, PrefixedPart) else {}
            for local, param in part.named_parameters():
                if id(param) in full:
                    peft_name = full[id(param)].replace(adapter, ".")
                    self.names.append((index, local, peft_name))
                elif local in prefix_names and param.requires_grad:
                    self.names.append((index, local, prefix_names[local]))

    def get(self, parts: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the parts' trainable tensors, by PEFT name."""
        params = [dict(part.named_parameters()) for part in parts]
        return {peft: params[i][local].detach().cpu().clone() for i, local, peft in self.names}

    def set(self, parts: Sequence[nn.Module], state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` (PEFT names) into the parts; every covered name must be present."""
        params = [dict(part.named_parameters()) for part in parts]
        missing = [peft for _, _, peft in self.names if peft not in state]
        if missing:
            raise ValueError(f"adapter state lacks {len(missing)} tensors, e.g. {missing[0]}")
        with torch.no_grad():
            for i, local, peft in self.names:
                target = params[i][local]
                source = state[peft]
                if source.shape != target.shape:
                    raise ValueError(
                        f"adapter tensor {peft} has shape {tuple(source.shape)}, expected "
                        f"{tuple(target.shape)}"
                    )
                target.copy_(source.to(device=target.device, dtype=target.dtype))


@dataclass
class ModelHalf:
    """One side's model: the PEFT model (other side's blocks dropped), its parts, its loader."""

    model: PeftModel
    parts: SplitParts
    loaded: LoadedModel

    @property
    def hidden_size(self) -> int:
        """Width of the activations that cross the split."""
        return int(self.model.config.hidden_size)


def _blocks(model: PeftModel) -> nn.ModuleList:
    base = model.get_base_model()
    decoder = getattr(base, "model", None) or getattr(base, "transformer", None)
    blocks = getattr(decoder, "layers", None)
    if blocks is None:
        blocks = decoder.h  # GPT-2
    return blocks


def _drop(model: PeftModel, parts: list[SplitPart]) -> None:
    """Replace the blocks of ``parts`` with placeholders so their weights can be freed."""
    blocks = _blocks(model)
    for part in parts:
        for index in part.layer_indices:
            blocks[index] = _Absent()
        for key in list(part.blocks.keys()):
            part.blocks[key] = _Absent()
    gc.collect()


def _model_folder(name: str) -> Path | None:
    """The local safetensors folder of a model name, or None (built from a config)."""
    if name == "smollm2-135m":
        return smollm2_folder()
    path = Path(name).expanduser()
    return path if (path / "model.safetensors").is_file() else None


def _is_llama_family(folder: Path) -> bool:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return config.get("model_type") in ("llama", "qwen2", "mistral")


def _load_silo_lean(cfg: JobConfig, folder: Path) -> LoadedModel:
    """Load only embeddings, head and tail blocks, final norm and LM head of a Llama-family folder.

    The model is built on the meta device, the trunk blocks are replaced by placeholders, and only
    the tensors the silo runs are read from ``model.safetensors``: the silo never holds the trunk,
    not even while loading.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(cfg.model.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    layers = config.num_hidden_layers
    keep = set(range(cfg.split.head_layers)) | set(range(layers - cfg.split.tail_layers, layers))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    decoder = model.model
    for index in range(layers):
        if index not in keep:
            decoder.layers[index] = _Absent()
    model.to_empty(device=device)
    decoder.rotary_emb = type(decoder.rotary_emb)(config=config).to(device)  # real buffers
    state = {}
    with safe_open(folder / "model.safetensors", framework="pt", device=str(device)) as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
            parts = key.split(".")
            if parts[:2] == ["model", "layers"] and int(parts[2]) not in keep:
                continue
            state[key] = fh.get_tensor(key).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = decoder.embed_tokens.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(
            f"model folder {folder} does not fit its config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    _ensure_pad_token(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=cfg.model.name, device=device)


def build_half(cfg: JobConfig, side: str) -> ModelHalf:
    """Load the base model, attach the seeded adapter, split it, and keep ``side``'s blocks.

    Parameters
    ----------
    cfg
        The job; ``split.head_layers``/``tail_layers`` choose the cut.
    side
        ``"silo"`` (embeddings, head, tail, final norm, LM head) or ``"trunk"`` (middle blocks).
    """
    if side not in ("silo", "trunk"):
        raise ValueError(f"side must be 'silo' or 'trunk', got {side!r}")
    check_split_config(cfg)
    folder = _model_folder(cfg.model.name) if side == "silo" else None
    if folder is not None and _is_llama_family(folder):
        loaded = _load_silo_lean(cfg, folder)
    else:
        loaded = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype, seed=cfg.train.seed)
    set_gradient_checkpointing(loaded.model, cfg.train.gradient_checkpointing)
    # SPF rows of this side's blocks only (each block's rows depend on its own weights).
    layers = side_layers(
        loaded.model.config.num_hidden_layers, cfg.split.head_layers, cfg.split.tail_layers, side
    )
    model = attach_adapter(loaded.model, cfg.adapter, seed=cfg.train.seed, spf_layers=layers)
    parts = split_model(model, cfg.split.head_layers, cfg.split.tail_layers)
    if side == "silo":
        _drop(model, [parts.trunk])
    else:
        _drop(model, [parts.head, parts.tail])
    if cfg.adapter.type == "prefix":
        parts = _with_prefix(model, parts, side)
        if not cfg.split.trunk_adapter:
            for param in parts.trunk.parameters():
                param.requires_grad_(False)
    return ModelHalf(model=model, parts=parts, loaded=loaded)


def _with_prefix(model: PeftModel, parts: SplitParts, side: str) -> SplitParts:
    """Wrap this side's parts in :class:`PrefixedPart`: each owns its layers' prefix rows.

    PEFT's own prefix embedding is frozen: the wrappers' per-layer tensors are what trains (the
    silo never holds the trunk layers' prefix, the coordinator never the head's or tail's).
    """
    prefix_embedding(model).weight.requires_grad_(False)
    if side == "silo":
        head, tail = PrefixedPart(parts.head, model), PrefixedPart(parts.tail, model)
        return SplitParts(head=head, trunk=parts.trunk, tail=tail)  # type: ignore[arg-type]
    trunk = PrefixedPart(parts.trunk, model)
    return SplitParts(head=parts.head, trunk=trunk, tail=parts.tail)  # type: ignore[arg-type]


def save_full_adapter(model: PeftModel, state: Mapping[str, torch.Tensor], out_dir: Path) -> None:
    """Write a complete PEFT adapter: ``model``'s adapter config and all tensors in ``state``.

    ``state`` holds the silo's and the coordinator's tensors together; the folder then loads with
    ``PeftModel.from_pretrained(base_model, out_dir)`` on the whole base model. A split prefix
    (``prefix.layers.<i>`` for every layer) is stacked into PEFT's ``prompt_embeddings``. SPF
    deltas of both sides (with the trunk's rows) go to ``spf_deltas.safetensors``, which
    :func:`~silotune.adapters.peft_adapters.load_adapter` attaches (:mod:`~.spf_parts`).

    Raises
    ------
    ModelError
        Before anything is written, if the tensors are not exactly the adapter ``model``'s config
        declares (names and shapes): plain PEFT would refuse, or silently load less.
    """
    state, spf = split_off_spf(state)  # SPF deltas (and the trunk's rows) go to their own file
    spf_file = complete_spf(model, spf, out_dir)
    if is_prefix_state(state):  # per-layer prefixes of both sides -> PEFT's one embedding
        tensors = {"prompt_embeddings": assemble_prompt_embeddings(state, model)}
    else:
        tensors = {name: t.detach().cpu().contiguous() for name, t in state.items()}
        _check_lora_tensors(model, tensors, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)  # writes adapter_config.json
    save_file(tensors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    write_split_spf(spf_file, out_dir)
    config_path = out_dir / "adapter_config.json"
    json.loads(config_path.read_text(encoding="utf-8"))  # fail here, not at load time


def _check_lora_tensors(model: PeftModel, tensors: Mapping[str, torch.Tensor], out: Path) -> None:
    """Refuse LoRA tensors that differ from those of ``model``'s adapter config on the whole model.

    The whole model is built on the meta device (no memory, no weights): each side of a split
    holds only some blocks, but the saved adapter must fit all of them.
    """
    config = copy.deepcopy(model.peft_config[model.active_adapter])
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        whole = get_peft_model(
            AutoModelForCausalLM.from_config(copy.deepcopy(model.config)), config
        )
    expected = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(whole).items()}
    problems = []
    missing = sorted(expected.keys() - tensors.keys())
    extra = sorted(tensors.keys() - expected.keys())
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    if extra:
        problems.append(f"{len(extra)} tensor(s) it does not declare, e.g. {extra[0]}")
    problems += [
        f"{name} has shape {tuple(tensors[name].shape)} where the config needs {shape}"
        for name, shape in expected.items()
        if name in tensors and tuple(tensors[name].shape) != shape
    ][:1]
    if problems:
        rank = getattr(config, "r", "?")
        raise ModelError(
            f"refusing to write an adapter to {out} that plain PEFT cannot load: its config "
            f"declares LoRA rank {rank}, but {'; '.join(problems)} (did the silo and the "
            "coordinator train with different adapter settings?)"
        )
