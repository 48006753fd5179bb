"""Split attacks on tiny-llama: each beats chance where it should and falls to chance under its defence."""

from __future__ import annotations

import pytest
import torch

from silotune.attacks.observe import observe_split
from silotune.attacks.run import AttackCache, run_attack
from silotune.config import JobConfig, config_from_dict


def job(**split) -> JobConfig:
    return config_from_dict(
        {
            "mode": "split",
            "model": "tiny-llama",
            "data": {"dataset": "fortunes-sample", "max_length": 64},
            "train": {
                "max_steps": 2,
                "batch_size": 8,
                "lr": 1e-3,
                "eval_every": 1000,
                "log_every": 1000,
            },  # fmt: skip
            "split": {"silos": 1, "timeout_s": 120, **split},
        }
    )


@pytest.fixture(scope="module")
def cache() -> AttackCache:
    return AttackCache(inverter_steps=150, inverter_texts=600)


def test_observation_is_what_the_trunk_received() -> None:
    obs = observe_split(job(head_layers=0), 1)
    # With head_layers 0 the trunk receives the token embeddings of the silo's batch, exactly.
    from silotune.attacks.public import public_model

    embed = public_model(job(head_layers=0)).embed
    assert len(obs.hidden) == len(obs.grad) == len(obs.input_ids) == 1
    torch.testing.assert_close(obs.hidden[0], embed[obs.input_ids[0]])
    assert obs.grad[0].abs().sum() > 0  # the tail's gradient, as the trunk got it


def test_nearest_recovers_every_token_at_head_layers_0(cache: AttackCache) -> None:
    row = run_attack("split-nearest", job(head_layers=0), cache=cache)
    assert row["leakage"] == 1.0 and row["sentences"] == 1.0 and row["label_recovery"] == 1.0
    assert row["chance"] < 0.1


def test_nearest_recovers_most_tokens_at_the_default_head_layers(cache: AttackCache) -> None:
    row = run_attack("split-nearest", job(), cache=cache)  # head_layers 1 (the default)
    assert row["leakage"] > 0.9 > row["chance"] * 5


def test_noise_far_above_the_activations_brings_the_nearest_attack_to_chance(cache) -> None:
    row = run_attack("split-nearest", job(noise_sigma=5.0), cache=cache)  # RMS about 0.03
    assert row["leakage"] <= row["chance"] + 0.03


@pytest.mark.slow
def test_learned_inverter_beats_the_table_at_four_head_layers(cache: AttackCache) -> None:
    cfg = job(head_layers=4)
    obs = observe_split(cfg, 2)
    nearest = run_attack("split-nearest", cfg, cache=cache, obs=obs)
    learned = run_attack("split-learned", cfg, cache=cache, obs=obs)
    assert learned["leakage"] > max(0.5, nearest["leakage"] + 0.2)


def test_label_inference_from_tail_gradients_and_its_noise_defence(cache: AttackCache) -> None:
    row = run_attack("split-labels", job(tail_layers=2), cache=cache)
    assert row["leakage"] > 0.95 > row["chance"] + 0.3
    noisy = run_attack("split-labels", job(noise_sigma=10.0), cache=cache)
    assert noisy["leakage"] <= noisy["chance"] + 0.25  # 80 rows: chance +- about 0.1


@pytest.mark.slow
def test_enclave_host_sees_only_ciphertext(cache: AttackCache) -> None:
    row = run_attack("split-ciphertext", job(), cache=cache)
    assert row["setting"]["trunk_in_enclave"]
    assert row["tokens"] > 500
    assert row["leakage"] <= row["chance"]
