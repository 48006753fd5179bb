"""Fold a trained adapter into its base model and save a plain Hugging Face folder.

`silotune models export NAME --merge --adapter DIR --out DIR` writes a model that
`AutoModelForCausalLM.from_pretrained` loads with no PEFT and no silotune: LoRA's low-rank update
is added to each target weight (PEFT's `merge_and_unload`) and SPF's trained rows to theirs. A
prefix (P-tuning v2) adapter is virtual key/value tokens, not a weight change, so it cannot be
merged; it is refused with the alternative named.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import PeftModel

from silotune.adapters.peft_adapters import load_adapter, read_adapter_dir
from silotune.adapters.spf import fold_spf
from silotune.errors import ConfigError, ModelError
from silotune.models.loading import load_model

log = logging.getLogger(__name__)

MERGEABLE = ("LORA",)


def merge_adapter(name: str, adapter_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """Load model `name` (seed: for presets built from a config), fold in `adapter_dir`, save."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelError(f"output folder {out_dir} is not an empty folder; choose another")
    config, _ = read_adapter_dir(adapter_dir)
    kind = config.get("peft_type")
    if kind not in MERGEABLE:
        raise ConfigError(
            f"adapter {adapter_dir} is {kind}; only LoRA (with or without SPF rows) can be merged "
            "into the weights. Load it with PeftModel.from_pretrained (or silotune eval --adapter)"
        )
    loaded = load_model(name, device="cpu", dtype="float32", seed=seed)
    model = merged_model(load_adapter(loaded.model, adapter_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out_dir)
    log.info("merged %s into %s and saved it to %s", adapter_dir, name, out_dir)
    return out_dir


def merged_model(model: PeftModel) -> torch.nn.Module:
    """The transformers model with SPF rows and LoRA folded into its weights (in place)."""
    fold_spf(model)
    return model.merge_and_unload()
