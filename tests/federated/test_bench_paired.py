"""`bench federated`'s paired check: one set of silo updates aggregated 3 ways."""

from __future__ import annotations

from pathlib import Path

import pytest

from silotune.bench import federated_paired
from silotune.config import JobConfig, config_from_dict
from tests.federated.harness import run_in_process

ROUNDS = 2


def make_cfg(tmp_path: Path, secagg: str) -> JobConfig:
    return config_from_dict(
        {
            "mode": "federated",
            "model": "tiny-llama",
            "data": {"dataset": "fortunes-sample", "max_length": 32, "max_eval_examples": 24},
            "train": {"batch_size": 4, "lr": 5e-3, "eval_batch_size": 16, "seed": 0},
            "output_dir": str(tmp_path / secagg),
            "federation": {
                "silos": 3,
                "rounds": ROUNDS,
                "local_steps": 2,
                "partition": "dirichlet",
                "secure_aggregation": secagg,
                "local_optimizer": "fresh",
            },
        }
    )


def test_paired_last_round(tmp_path: Path) -> None:
    runs = {m: make_cfg(tmp_path, m) for m in ("none", "masking")}
    summaries = {m: run_in_process(cfg)[0] for m, cfg in runs.items()}
    paired = federated_paired.paired_last_round(runs["none"])
    assert set(paired) == {"none", "masking", "he"}
    # Recomputing the last round in this process reproduces the plain run's final model
    # (fresh silo optimizers in the run as in the recomputation).
    assert paired["none"]["accuracy"] == summaries["none"]["test"]["accuracy"]
    assert paired["none"]["max_abs_diff"] == 0.0
    # Within each codec's quantisation step (masking 32-bit, HE two values per BFV slot).
    assert 0 < paired["masking"]["max_abs_diff"] < 1e-8
    assert 0 < paired["he"]["max_abs_diff"] < 1e-5
    assert federated_paired.summarise(paired) == {"masking": 0.0, "he": 0.0}


def test_paired_check_needs_every_round_kept(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "none")
    with pytest.raises(FileNotFoundError, match="keep_checkpoints"):
        federated_paired.paired_last_round(cfg)
