"""Shared fixtures: tiny Hugging Face model folders per architecture and a fast job-config factory."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

# Tiny models gain nothing from intra-op threads, and on a busy shared machine OpenMP threads
# spinning for a core cost up to 100x (measured: 3 LoRA steps 0.05 s with 1 thread, 15 s with 2
# at load 7 on 2 cores). Subprocesses (CLI tests) inherit the setting. Override by exporting it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from silotune.config import JobConfig, config_from_dict
from silotune.models.presets import tiny_llama_tokenizer

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY_ARCHS = ("llama", "qwen2", "mistral", "gpt2")


def build_tiny_arch(arch: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A 2-layer, hidden-64 causal LM of `arch` with seeded weights."""
    decoder = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    configs = {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**decoder)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**decoder)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**decoder)),
        "gpt2": lambda: GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab_size,
                n_embd=64,
                n_layer=2,
                n_head=4,
                n_positions=128,
                resid_pdrop=0.0,  # no dropout: a train-mode step is then deterministic
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=1,
            )
        ),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return configs[arch]().float().eval()


@pytest.fixture(scope="session")
def tiny_hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: `tiny_hf_folder("qwen2")` -> a saved HF folder (weights + tiny-llama tokenizer)."""
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            folder = tmp_path_factory.mktemp(f"hf-{arch}")
            tokenizer = tiny_llama_tokenizer()
            build_tiny_arch(arch, len(tokenizer)).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            made[arch] = folder
        return made[arch]

    return make


FAST_JOB = {
    "mode": "centralized",
    "model": "tiny-llama",
    "adapter": {"type": "lora", "r": 4},
    "data": {"dataset": "fortunes-sample", "max_length": 64, "max_eval_examples": 8},
    "train": {"max_steps": 4, "batch_size": 4, "lr": 5e-3, "eval_every": 2, "log_every": 1},
}


@pytest.fixture
def make_job(tmp_path: Path) -> Callable[..., JobConfig]:
    """Factory: `make_job("train.max_steps=6", ...)` -> a fast JobConfig writing under tmp_path."""

    def make(*overrides: str, output_dir: Path | None = None) -> JobConfig:
        data = {**FAST_JOB, "output_dir": str(output_dir or tmp_path / "run")}
        return config_from_dict(data, list(overrides))

    return make


@pytest.fixture
def main_in_process(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """Run `silotune.cli.main` here (cheaper than a process); same result shape as `silotune`."""
    from silotune.cli import main

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["silotune", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main()
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, int(info.value.code or 0), out, err)

    yield run
    root.handlers[:], _ = saved  # main() installs a rich handler on the root logger
    root.setLevel(saved[1])


def assert_clean_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    """The CLI failed as a user should see it: exit 1, no traceback, last line `error: ...`."""
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and expected in last, result.stderr


def save_random_adapter(
    folder: Path, cfg: object, *, base_seed: int = 0, scale: float = 0.05, seed: int = 1
) -> Path:
    """Save an adapter (`cfg`: an AdapterConfig) on tiny-llama whose every trainable tensor is
    random, so it changes the model's output (a fresh LoRA's B is zero)."""
    from silotune.adapters.peft_adapters import attach_adapter, save_adapter
    from silotune.models.presets import build_tiny_llama

    model = attach_adapter(build_tiny_llama(base_seed)[0], cfg)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    save_adapter(model, folder)
    return folder
