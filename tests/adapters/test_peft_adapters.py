"""Tests for silotune.adapters.peft_adapters: PEFT-format adapters that plain PEFT loads identically."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from silotune.adapters.peft_adapters import (
    adapter_state,
    attach_adapter,
    load_adapter,
    peft_config,
    read_adapter_dir,
    set_adapter_state,
)
from silotune.config import AdapterConfig, JobConfig, config_from_dict
from silotune.errors import CheckpointError
from silotune.eval.evaluate import evaluate
from silotune.eval.runner import evaluate_job
from silotune.models.loading import load_model
from silotune.models.presets import build_tiny_llama
from silotune.train.trainer import train_centralized
from tests.conftest import FAST_JOB, build_tiny_arch

PROMPTS = ["Fortune: Live long and prosper.\nCategory:", "Fortune: Eat dessert first.\nCategory:"]


@pytest.fixture(scope="module")
def exported_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama written by `silotune models export` (a plain HF folder)."""
    out = tmp_path_factory.mktemp("export") / "tiny-llama"
    result = subprocess.run(
        [sys.executable, "-m", "silotune.cli", "models", "export", "tiny-llama", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module", params=["lora", "prefix"])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> JobConfig:
    """A short silotune run of each adapter type (LoRA with k_proj too, to go past the defaults)."""
    extra = (
        ["adapter.target_modules=[q_proj, k_proj, v_proj]", "adapter.dropout=0.1"]
        if request.param == "lora"
        else ["adapter.type=prefix", "adapter.num_virtual_tokens=5"]
    )
    out = tmp_path_factory.mktemp(request.param) / "run"
    cfg = config_from_dict({**FAST_JOB, "output_dir": str(out)}, ["train.max_steps=3", *extra])
    train_centralized(cfg, progress=False)
    return cfg


def last_logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:  # noqa: ANN001
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_plain_peft_loads_the_adapter_with_identical_logits(
    exported_base: Path, trained: JobConfig
) -> None:
    adapter_dir = trained.output_dir / "adapter"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == ("LORA" if trained.adapter.type == "lora" else "PREFIX_TUNING")

    base = AutoModelForCausalLM.from_pretrained(exported_base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(exported_base)
    plain = PeftModel.from_pretrained(base, adapter_dir).eval()

    loaded = load_model(trained.model.name, "cpu", "float32", seed=trained.train.seed)
    ours = load_adapter(loaded.model, adapter_dir).eval()

    want = last_logits(ours, loaded.tokenizer)
    got = last_logits(plain, tokenizer)
    assert (got - want).abs().max().item() <= 1e-6
    # and the adapter does something: it is not the base model's output
    bare = AutoModelForCausalLM.from_pretrained(exported_base, dtype=torch.float32)
    assert (last_logits(bare, tokenizer) - want).abs().max().item() > 1e-5


def test_silotune_eval_scores_match_plain_peft_and_the_run(
    exported_base: Path, trained: JobConfig
) -> None:
    from silotune.data.registry import load_splits
    from silotune.data.tasks import make_task

    adapter_dir = trained.output_dir / "adapter"
    scores = evaluate_job(trained, adapter_dir, "test")
    summary = json.loads((trained.output_dir / "summary.json").read_text())
    assert scores == pytest.approx(summary["test"], abs=1e-9)

    tokenizer = AutoTokenizer.from_pretrained(exported_base)
    base = AutoModelForCausalLM.from_pretrained(exported_base, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, adapter_dir)
    splits = load_splits(trained.data)
    task = make_task(tokenizer, "classification", splits.labels, splits.prompt_template, 64)
    plain_scores = evaluate(plain, task, splits.test, 16, torch.device("cpu"))
    assert plain_scores == pytest.approx(scores, abs=1e-9)


def test_peft_config_translation() -> None:
    llama, _ = build_tiny_llama(0)
    lora = peft_config(AdapterConfig(r=4, dropout=0.05), llama)
    assert isinstance(lora, LoraConfig)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (4, 8.0, 0.05)
    assert set(lora.target_modules) == {"q_proj", "v_proj"} and not lora.fan_in_fan_out
    gpt2 = build_tiny_arch("gpt2", 64)
    gpt2_lora = peft_config(AdapterConfig(alpha=3.0), gpt2)
    assert set(gpt2_lora.target_modules) == {"c_attn"} and gpt2_lora.fan_in_fan_out
    assert gpt2_lora.lora_alpha == 3.0
    prefix = peft_config(AdapterConfig(type="prefix", num_virtual_tokens=7), llama)
    assert isinstance(prefix, PrefixTuningConfig) and prefix.num_virtual_tokens == 7


def test_attach_is_seeded_and_freezes_the_base() -> None:
    states = [
        adapter_state(attach_adapter(build_tiny_llama(0)[0], AdapterConfig(r=4), seed=s))
        for s in (0, 0, 1)
    ]
    a_keys = [k for k in states[0] if "lora_A" in k]
    assert a_keys and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert all(not torch.equal(states[0][k], states[2][k]) for k in a_keys)
    model = attach_adapter(build_tiny_llama(0)[0], AdapterConfig(r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_set_adapter_state_round_trip_and_refusals() -> None:
    source = attach_adapter(build_tiny_llama(0)[0], AdapterConfig(r=4), seed=3)
    target = attach_adapter(build_tiny_llama(0)[0], AdapterConfig(r=4), seed=4)
    state = adapter_state(source)
    set_adapter_state(target, state)
    assert all(torch.equal(adapter_state(target)[k], v) for k, v in state.items())

    missing = dict(list(state.items())[1:])
    with pytest.raises(CheckpointError, match="lacks 1 tensors"):
        set_adapter_state(target, missing)
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        set_adapter_state(target, {**state, "base_model.model.extra.lora_A.weight": torch.ones(1)})
    prefix = attach_adapter(build_tiny_llama(0)[0], AdapterConfig(type="prefix"))
    with pytest.raises(CheckpointError, match="does not fit"):
        set_adapter_state(prefix, state)


def test_read_adapter_dir_reports_each_problem(tmp_path: Path) -> None:
    model = attach_adapter(build_tiny_llama(0)[0], AdapterConfig(r=2))
    model.save_pretrained(tmp_path)
    config, tensors = read_adapter_dir(tmp_path)
    assert config["r"] == 2 and tensors.keys() == adapter_state(model).keys()

    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="corrupt or not safetensors"):
        read_adapter_dir(tmp_path)
    save_file({"x": torch.ones(1)}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_adapter_dir(tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="has no adapter_config.json"):
        load_adapter(build_tiny_llama(0)[0], tmp_path)


def test_an_adapter_for_another_architecture_is_refused(trained: JobConfig) -> None:
    gpt2 = build_tiny_arch("gpt2", 4096)
    with pytest.raises(CheckpointError, match="does not fit the base model"):
        load_adapter(gpt2, trained.output_dir / "adapter")
