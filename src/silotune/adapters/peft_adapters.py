"""Attach, save, load and read the state of PEFT adapters (LoRA and P-tuning v2 prefix, SPF deltas)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peft.utils import _prepare_prompt_learning_config
from safetensors.torch import load_file
from transformers import PreTrainedModel

from silotune.adapters.spf import attach_spf, load_spf, save_spf, spf_lora_targets
from silotune.config import AdapterConfig
from silotune.errors import CheckpointError, ModelError

# Default LoRA targets per architecture: the attention query and value projections, as in the
# LoRA paper and the FIELD-NOTES reference runs. GPT-2 fuses q, k, v into one Conv1D, `c_attn`.
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def default_targets(model: PreTrainedModel) -> list[str]:
    """LoRA target modules for this architecture, or a clear error naming the supported ones."""
    kind = model.config.model_type
    if kind not in DEFAULT_LORA_TARGETS:
        raise ModelError(
            f"no default LoRA targets for model type '{kind}' (known: "
            f"{', '.join(DEFAULT_LORA_TARGETS)}); set adapter.target_modules"
        )
    return DEFAULT_LORA_TARGETS[kind]


def peft_config(cfg: AdapterConfig, model: PreTrainedModel) -> PeftConfig:
    """Translate silotune's adapter section into a PEFT config."""
    if cfg.type == "lora":
        # With SPF, LoRA goes by default on the projections SPF does not train.
        if cfg.target_modules:
            targets = cfg.target_modules
        else:
            targets = spf_lora_targets(model) if cfg.spf.enabled else default_targets(model)
        return LoraConfig(
            task_type="CAUSAL_LM",
            r=cfg.r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.dropout,
            target_modules=targets,
            fan_in_fan_out=model.config.model_type == "gpt2",
        )
    # P-tuning v2 = deep prompt tuning: trainable key/value prefixes in every layer.
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens)


def attach_adapter(
    model: PreTrainedModel,
    cfg: AdapterConfig,
    seed: int = 0,
    spf_layers: Iterable[int] | None = None,
) -> PeftModel:
    """Freeze `model` and wrap it with a freshly initialised adapter (initialisation seeded).

    With ``cfg.spf.enabled`` the SPF deltas (zero at first) are attached after LoRA, on the
    rows selected from the frozen base weights: of the decoder blocks ``spf_layers`` (a split
    side's own blocks), or of every block by default.
    """
    config = peft_config(cfg, model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as err:
            raise ModelError(f"cannot attach the {cfg.type} adapter: {err}") from err
    if cfg.spf.enabled:
        attach_spf(peft_model, cfg.spf, spf_layers)
    return peft_model


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors only (PEFT names), detached copies on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def set_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors (PEFT names) into `model`, failing if any is missing or unexpected."""
    try:
        result = set_peft_model_state_dict(model, state)
    except (RuntimeError, KeyError, ValueError) as err:
        # e.g. a rank-4 checkpoint into a rank-2 adapter, or LoRA tensors into a prefix adapter
        raise CheckpointError(
            f"adapter state does not fit this adapter: {_first_line(err)}"
        ) from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise CheckpointError(f"adapter state has unexpected tensors, e.g. {unexpected[0]}")
    expected = set(get_peft_model_state_dict(model))
    missing = expected - set(state)
    if missing:
        raise CheckpointError(
            f"adapter state lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}"
        )


def save_adapter(model: PeftModel, out_dir: Path) -> None:
    """Save in PEFT format (adapter_config.json + adapter_model.safetensors), plus
    spf_deltas.safetensors when the model has SPF deltas (plain PEFT ignores that file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_spf(model, out_dir)


def read_adapter_dir(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and check a PEFT adapter folder: (config dict, tensors), with one clear error if bad."""
    cfg_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"adapter folder {adapter_dir} has no {path.name}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {err}") from None
    try:
        tensors = load_file(weights_path)
    except Exception as err:  # safetensors raises its own SafetensorError for corrupt files
        raise CheckpointError(f"{weights_path} is corrupt or not safetensors: {err}") from None
    return config, tensors


def load_adapter(base: PreTrainedModel, adapter_dir: Path, trainable: bool = False) -> PeftModel:
    """Load a saved adapter onto `base` (checked first, so a corrupt folder fails clearly).

    SPF deltas saved next to the PEFT files are attached too, on the rows they were saved with.
    """
    config, _ = read_adapter_dir(adapter_dir)
    if config.get("peft_type") == "PREFIX_TUNING":
        _check_prefix_fits(base, config, adapter_dir)
    try:
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable)
    except (RuntimeError, KeyError, ValueError) as err:  # wrong base model or adapter shape
        raise CheckpointError(
            f"adapter {adapter_dir} does not fit the base model: {_first_line(err)}"
        ) from None
    load_spf(model, adapter_dir, trainable)
    return model


def _check_prefix_fits(base: PreTrainedModel, saved: dict, adapter_dir: Path) -> None:
    """A prefix's shape comes from its saved config, so PEFT would load one made for another
    model and fail (or worse) only at the first forward pass; compare the shapes up front."""
    want = _prepare_prompt_learning_config(
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=1), base.config
    )
    for key in ("num_layers", "token_dim", "num_attention_heads"):
        if saved.get(key) != getattr(want, key):
            raise CheckpointError(
                f"adapter {adapter_dir} does not fit the base model: its prefix has {key} "
                f"{saved.get(key)}, the model needs {getattr(want, key)}"
            )


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # torch's load_state_dict puts the useful part ("size mismatch for ...") on line 2
    useful = [line for line in lines if not line.startswith("Error(s) in loading")]
    return (useful or lines or [type(err).__name__])[0]
