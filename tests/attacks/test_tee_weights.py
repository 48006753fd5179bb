"""Adapter in the TEE: a reused mask hands the REE the LoRA weights; fresh masks leave it at chance."""

from __future__ import annotations

import pytest
import torch

from silotune.adapters.peft_adapters import adapter_state, attach_adapter
from silotune.attacks.tee_weights import _shared_direction, tee_weight_leakage, true_deltas
from silotune.config import AdapterConfig
from silotune.models.loading import load_model
from tests.conftest import FAST_JOB

# Batch 8: with FAST_JOB's 4 the attention rows underdetermine v_proj's delta even in the clear.
JOB = {**FAST_JOB, "train": {**FAST_JOB["train"], "batch_size": 8}}
QUICK = {"train_steps": 4, "observe_steps": 1, "refine_iters": 30}


def test_a_reused_mask_lets_the_ree_recover_the_lora_weights() -> None:
    row = tee_weight_leakage(JOB, 1e4, reuse=True, **QUICK)
    assert row["token_recovery"] > 0.95  # the known plaintext that unmasks everything else
    assert row["by_target"]["v_proj"]["cosine"] > 0.9
    assert row["by_target"]["v_proj"]["relative_error"] < 0.3  # the zero guess scores 1
    assert row["by_target"]["q_proj"]["cosine"] > 10 * row["chance"]  # weaker, still above
    assert row["leakage"] > 0.4 > 20 * row["chance"]


@pytest.mark.parametrize("mask_std", [1.0, 1e4])
def test_fresh_masks_leave_the_ree_at_chance(mask_std: float) -> None:
    row = tee_weight_leakage(JOB, mask_std, reuse=False, **QUICK)
    assert abs(row["leakage"]) < 3 * row["chance"]
    assert abs(row["by_target"]["v_proj"]["cosine"]) < 3 * row["chance"]


def test_the_same_attack_recovers_the_weights_through_negligible_fresh_masks() -> None:
    row = tee_weight_leakage(JOB, 1e-3, reuse=False, **QUICK)  # chance above is the masks' doing
    assert row["by_target"]["v_proj"]["cosine"] > 0.5 and row["leakage"] > 0.3


def test_the_shared_mask_test_tells_one_reused_mask_from_fresh_ones() -> None:
    gen = torch.Generator().manual_seed(0)
    clear = [torch.randn(4, 16, 32, generator=gen) for _ in range(6)]
    z = torch.randn(4, 16, 32, generator=gen)
    fresh = [x + 1e4 * torch.randn(x.shape, generator=gen) for x in clear]
    reused = [x + 1e4 * (i + 1) * z for i, x in enumerate(clear)]
    assert _shared_direction(fresh) is None
    u = _shared_direction(reused)
    assert u is not None and abs(float(u @ z.flatten().double())) / float(z.norm()) > 0.999


def test_the_truth_is_the_delta_peft_adds_to_each_layer() -> None:
    model = load_model("tiny-llama", "cpu", "float32").model
    cfg = AdapterConfig(r=4)
    peft_model = attach_adapter(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B starts at zero; any value will do
    deltas = true_deltas(adapter_state(peft_model), cfg.lora_alpha / cfg.r)
    layers = {
        n.removeprefix("base_model.model."): m
        for n, m in peft_model.named_modules()
        if hasattr(m, "get_delta_weight")
    }
    assert set(deltas) == set(layers) and len(deltas) == 12  # q and v of 6 blocks
    for name, delta in deltas.items():
        torch.testing.assert_close(delta.float(), layers[name].get_delta_weight("default"))
