"""Load a causal LM and its tokenizer from a preset name or a local Hugging Face folder, offline."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from silotune.errors import ModelError
from silotune.models.presets import PRESETS, build_tiny_llama, smollm2_folder

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A base model with its tokenizer, on the device and in the dtype asked for."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device


def resolve_device(device: str) -> torch.device:
    """Map `auto | cpu | cuda | cuda:N | mps` to a torch device, failing clearly when absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ModelError(
            f"model.device '{device}' is not a device (use auto, cpu, cuda, cuda:N)"
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            f"model.device is '{device}' but no CUDA device is available; use auto or cpu"
        )
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Map `auto | float32 | bfloat16 | float16`; auto is bf16 on CUDA with bf16 support, else fp32."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"model.dtype '{dtype}' is not supported (use auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError("the tokenizer has neither a pad nor an eos token; add one to it")
        tokenizer.pad_token = tokenizer.eos_token


def _load_folder(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model folder {path} has no config.json (not a Hugging Face model folder)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load the model folder {path}: {_first_line(err)}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(
            f"cannot load a tokenizer from the model folder {path} (save one there with "
            f"tokenizer.save_pretrained): {_first_line(err)}"
        ) from err
    if not tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
        # transformers builds an empty tokenizer for some model types (gpt2, qwen2) when the
        # folder has no tokenizer files; it would silently turn every text into nothing.
        raise ModelError(
            f"the model folder {path} has no usable tokenizer (it encodes text to nothing); "
            "save one there with tokenizer.save_pretrained"
        )
    return model, tokenizer


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].strip().rstrip(":") if text else type(err).__name__


def load_model(name: str, device: str = "auto", dtype: str = "auto", seed: int = 0) -> LoadedModel:
    """Load a preset (`tiny-llama`, `smollm2-135m`) or a local HF causal-LM folder; never the network.

    Parameters
    ----------
    name:
        A preset name or the path of a folder holding `config.json`, weights and a tokenizer.
    device, dtype:
        See `resolve_device` and `resolve_dtype`.
    seed:
        Initialisation seed for presets built from a config (`tiny-llama`).
    """
    # Model hubs are out of reach by design: make transformers fail fast rather than retry.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if name == "tiny-llama":
        model, tokenizer = build_tiny_llama(seed)
        model = model.to(torch_dtype)
    elif name == "smollm2-135m":
        model, tokenizer = _load_folder(smollm2_folder(), torch_dtype)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelError(
                f"model '{name}' is neither a preset ({', '.join(PRESETS)}) nor an existing folder"
            )
        model, tokenizer = _load_folder(path, torch_dtype)
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        # token ids past the embedding would fail deep inside the first forward pass
        raise ModelError(
            f"model '{name}': its tokenizer has {len(tokenizer)} tokens but the embedding only "
            f"{rows} rows; save the model's own tokenizer in the folder"
        )
    _ensure_pad_token(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(dev)
    model.eval()
    log.info("Loaded %s (%.1fM params) on %s as %s", name, _millions(model), dev, torch_dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, device=dev)


def set_gradient_checkpointing(model: PreTrainedModel, enabled: bool) -> None:
    """Recompute each decoder block's activations in backward instead of keeping them.

    Uses PyTorch's non-reentrant checkpointing, which needs no gradient on the (frozen) inputs, so
    adapters train as they do without it. A no-op when ``enabled`` is false.
    """
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # training keeps no cache; saves transformers' warning


def export_model(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a preset (or folder) as a standard HF folder that `from_pretrained` loads."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelError(f"output folder {out_dir} is a file; choose a folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ModelError(f"output folder {out_dir} is not empty; choose another or empty it")
    loaded = load_model(name, device="cpu", dtype="float32", seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out_dir)
    loaded.tokenizer.save_pretrained(out_dir)
    return out_dir


def _millions(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6
