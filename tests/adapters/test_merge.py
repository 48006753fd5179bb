"""Tests for silotune.adapters.merge: a merged folder computes what base + adapter computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from silotune.adapters.merge import merge_adapter
from silotune.adapters.peft_adapters import load_adapter
from silotune.adapters.spf import spf_deltas
from silotune.config import AdapterConfig, SPFConfig
from silotune.errors import ConfigError, ModelError
from silotune.models.presets import build_tiny_llama
from tests.conftest import assert_clean_error, save_random_adapter

PROMPT = torch.tensor([[5, 17, 300, 42, 9, 1000, 77]])


def trained_adapter(folder: Path, cfg: AdapterConfig, seed: int = 0) -> Path:
    """Save an adapter whose every trainable tensor is random (so nothing merges as zero)."""
    return save_random_adapter(folder, cfg, base_seed=seed)


def logits_with_adapter(adapter_dir: Path, seed: int = 0) -> torch.Tensor:
    model = load_adapter(build_tiny_llama(seed)[0], adapter_dir).eval()
    with torch.no_grad():
        return model(PROMPT).logits


def logits_of_folder(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # plain transformers, no PEFT
    with torch.no_grad():
        return model(PROMPT).logits


@pytest.mark.parametrize("spf", [False, True], ids=["lora", "lora+spf"])
def test_merged_folder_computes_what_the_adapter_computes(tmp_path, spf) -> None:
    cfg = AdapterConfig(r=4, spf=SPFConfig(enabled=spf, head_ratio=0.5, ffn_ratio=0.5))
    adapter = trained_adapter(tmp_path / "adapter", cfg)
    merged = merge_adapter("tiny-llama", adapter, tmp_path / "merged")
    want, got = logits_with_adapter(adapter), logits_of_folder(merged)
    base = build_tiny_llama(0)[0].eval()
    with torch.no_grad():
        moved = (want - base(PROMPT).logits).abs().max().item()
    assert moved > 1e-2  # the adapter really changes the output...
    assert torch.allclose(got, want, atol=1e-5, rtol=0)  # ...and the merged weights carry it
    assert not (merged / "adapter_config.json").exists()


def test_folding_spf_removes_its_hooks(tmp_path) -> None:
    cfg = AdapterConfig(r=2, spf=SPFConfig(enabled=True, head_ratio=0.5, ffn_ratio=0.5))
    adapter = trained_adapter(tmp_path / "adapter", cfg)
    from silotune.adapters.merge import merged_model

    model = merged_model(load_adapter(build_tiny_llama(0)[0], adapter))
    assert not spf_deltas(model)
    assert not any(m._forward_hooks for m in model.modules())  # a left hook would add rows twice


def test_prefix_adapters_are_refused_with_the_alternative(tmp_path) -> None:
    adapter = trained_adapter(tmp_path / "adapter", AdapterConfig(type="prefix"))
    with pytest.raises(ConfigError, match="PREFIX_TUNING; only LoRA.*PeftModel.from_pretrained"):
        merge_adapter("tiny-llama", adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_wrong_base_seed_gives_a_different_model(tmp_path) -> None:
    # tiny-llama's weights come from the job's seed: merging onto another seed is another model
    adapter = trained_adapter(tmp_path / "adapter", AdapterConfig(r=2), seed=3)
    right = merge_adapter("tiny-llama", adapter, tmp_path / "right", seed=3)
    wrong = merge_adapter("tiny-llama", adapter, tmp_path / "wrong", seed=0)
    want = logits_with_adapter(adapter, seed=3)
    assert torch.allclose(logits_of_folder(right), want, atol=1e-5, rtol=0)
    assert not torch.allclose(logits_of_folder(wrong), want, atol=1e-2)


def test_non_empty_output_is_refused(tmp_path) -> None:
    adapter = trained_adapter(tmp_path / "adapter", AdapterConfig(r=2))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="not an empty folder"):
        merge_adapter("tiny-llama", adapter, tmp_path / "out")


def test_cli_export_merge(tmp_path, main_in_process) -> None:
    adapter = trained_adapter(tmp_path / "adapter", AdapterConfig(r=2))
    out = tmp_path / "merged"
    args = ["models", "export", "tiny-llama", "--merge", "--adapter", str(adapter)]
    result = main_in_process(*args, "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert torch.allclose(logits_of_folder(out), logits_with_adapter(adapter), atol=1e-5, rtol=0)
    lonely = main_in_process(
        "models", "export", "tiny-llama", "--merge", "--out", "x", cwd=tmp_path
    )
    assert_clean_error(lonely, "--merge and --adapter DIR go together")
    prefix = trained_adapter(tmp_path / "prefix", AdapterConfig(type="prefix"))
    refused = main_in_process(*args[:-1], str(prefix), "--out", "y", cwd=tmp_path)
    assert_clean_error(refused, "only LoRA (with or without SPF rows) can be merged")
