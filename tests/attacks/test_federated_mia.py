"""Federated membership inference: the metrics, and the attack on a real one-round federation."""

from __future__ import annotations

import pytest

from silotune.attacks.federated_mia import auc, run_mia, tpr_at_fpr
from silotune.config import config_from_dict


def test_auc_and_tpr_at_low_fpr() -> None:
    assert auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert auc([1.0], [1.0]) == 0.5
    others = [float(i) for i in range(100)]  # 1% FPR lets exactly one non-member through
    assert tpr_at_fpr([98.5, 99.5, 50.0], others) == pytest.approx(2 / 3)  # above 98
    assert tpr_at_fpr([100.0, 101.0], others) == 1.0


@pytest.mark.slow
def test_one_silos_update_leaks_membership_and_strong_dp_brings_it_to_chance() -> None:
    cfg = config_from_dict(
        {
            "mode": "federated",
            "model": "tiny-llama",
            "adapter": {"type": "lora", "r": 8},
            "data": {"dataset": "fortunes-sample", "task": "lm", "max_length": 64},
            "train": {"batch_size": 8, "lr": 5e-3, "eval_batch_size": 32},
            "federation": {"silos": 4, "rounds": 1, "local_steps": 30, "min_silos": 2},
        }
    )
    dp = {"enabled": True, "clip_norm": 2.0, "noise_multiplier": 8.0}
    settings = [
        {"silos": 1, "secure_aggregation": "none"},
        {"silos": 1, "secure_aggregation": "none", "dp": dp},
    ]
    clear, private = run_mia(cfg, settings, shadows=2)["rows"]
    assert clear["leakage"] > 0.6 and clear["loss_auc"] > 0.6  # 100 members, 160 held out
    assert abs(private["leakage"] - 0.5) < 0.1 and private["epsilon"] < 1.0
