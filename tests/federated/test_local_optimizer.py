"""federation.local_optimizer: a persistent silo AdamW continues across rounds exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from silotune.federated import silo
from silotune.federated.vectors import flatten, load_flat
from silotune.train.job import build_job
from silotune.train.loop import make_optimizer, train_step
from tests.federated.test_rounds import make_cfg

STEPS = 3


def _two_rounds(cfg, persistent: bool) -> np.ndarray:
    """One silo, two rounds, the global set to the silo's result in between (FedAvg of one)."""
    global_vec = flatten(build_job(cfg).model)
    moments = None
    for round_no in (1, 2):
        result, _, new_moments = silo.local_round(cfg, 0, global_vec, round_no, None, None, moments)
        global_vec = global_vec + result.values
        moments = new_moments if persistent else None
    return global_vec


def test_persistent_moments_equal_one_uninterrupted_optimizer(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path, "persist", silos=1, min_silos=1, local_steps=STEPS, local_optimizer="persistent"
    )
    job = build_job(cfg)
    _, stream = silo._stream(cfg, 0)
    load_flat(job.model, flatten(build_job(cfg).model))
    optimizer = make_optimizer(job.model, cfg.train)
    for step in range(2 * STEPS):  # the same batches the two rounds see
        train_step(job.model, stream, step, optimizer, None, cfg.train, job.device)
    reference = flatten(job.model)
    persistent = _two_rounds(cfg, persistent=True)
    assert float(np.abs(persistent - reference).max()) <= 1e-6
    fresh = _two_rounds(cfg, persistent=False)  # a new AdamW in round 2 is another trajectory
    assert float(np.abs(fresh - reference).max()) > 1e-5


def test_kept_moments_of_another_size_are_refused(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "bad", silos=1, min_silos=1, local_steps=1)
    vec = flatten(build_job(cfg).model)
    wrong = (np.zeros(3, np.float32), np.zeros(3, np.float32), 1.0)
    with pytest.raises(silo.FederationError, match="kept optimizer state holds 3 values"):
        silo.local_round(cfg, 0, vec, 1, None, None, wrong)
