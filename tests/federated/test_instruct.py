"""Federated instruction tuning: one domain per silo, rounds through the real coordinator."""

from __future__ import annotations

from pathlib import Path

import pytest

from silotune.config import config_from_dict
from silotune.data.partition import partition_groups
from silotune.errors import DataError
from silotune.federated import silo
from silotune.train.job import build_job
from tests.federated.harness import run_in_process


def make_cfg(tmp_path: Path, **federation: object):
    fed = {"silos": 3, "rounds": 2, "local_steps": 2, "min_silos": 2, "partition": "domain"}
    fed.update(federation)
    return config_from_dict(
        {
            "mode": "federated",
            "model": "tiny-llama",
            "data": {
                "dataset": "dictionaries-sample",
                "task": "instruction",
                "max_length": 64,
                "max_eval_examples": 4,
            },
            "train": {"batch_size": 4, "lr": 1e-3, "eval_batch_size": 8, "seed": 0},
            "eval": {"max_new_tokens": 4, "generation_examples": 2},
            "output_dir": str(tmp_path / "run"),
            "federation": fed,
        }
    )


def test_partition_groups_gives_whole_groups() -> None:
    groups = ["b", "a", "c", "a", "b", "c", "a"]
    assert partition_groups(groups, 3) == [[1, 3, 6], [0, 4], [2, 5]]
    assert partition_groups(groups, 2) == [[1, 2, 3, 5, 6], [0, 4]]  # a, c | b
    with pytest.raises(DataError, match="the data has 3 .* use at most 3 parts"):
        partition_groups(groups, 4)


def test_each_silo_holds_one_domain(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    job = build_job(cfg)
    domains = [
        {job.splits.train[i]["domain"] for i in silo.silo_indices(cfg, job, k)} for k in range(3)
    ]
    assert domains == [{"computing"}, {"general"}, {"jargon"}]


def test_a_federated_instruction_job_runs_and_evaluates(tmp_path: Path) -> None:
    summary, _, _ = run_in_process(make_cfg(tmp_path, secure_aggregation="masking"))
    test = summary["test"]
    assert summary["rounds"] == 2
    assert {"loss", "rouge_l", "exact_match", "mc_accuracy"} <= set(test)
    assert test["generated"] == 4 and test["mc_examples"] == 4
