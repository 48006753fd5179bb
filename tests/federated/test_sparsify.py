"""Pruning schedule, shared supports and error feedback."""

from __future__ import annotations

import numpy as np
import pytest

from silotune.config.federation import PruningConfig
from silotune.federated.sparsify import (
    densify,
    kept_count,
    pruning_rate,
    random_support,
    sparsify,
    topk_support,
)


def test_schedule_ramps_linearly_and_clamps_at_the_target() -> None:
    cfg = PruningConfig(enabled=True, start_round=3, end_round=7, initial_rate=0.2, target_rate=0.6)
    rates = [pruning_rate(cfg, r) for r in range(1, 10)]
    assert rates[:2] == [0.0, 0.0]
    assert rates[2:7] == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6])
    assert rates[7:] == [0.6, 0.6]
    assert pruning_rate(PruningConfig(enabled=False, target_rate=0.9), 5) == 0.0


def test_random_support_is_shared_per_round_and_fresh_across_rounds() -> None:
    a = random_support(1000, 250, seed=7, round_no=3)
    assert a.size == 250 and (np.diff(a) > 0).all() and a[-1] < 1000
    assert np.array_equal(a, random_support(1000, 250, seed=7, round_no=3))
    assert not np.array_equal(a, random_support(1000, 250, seed=7, round_no=4))
    assert not np.array_equal(a, random_support(1000, 250, seed=8, round_no=3))


def test_topk_support_takes_the_largest_magnitudes() -> None:
    prev = np.array([0.1, -5.0, 0.0, 3.0, -0.2], dtype=np.float32)
    assert topk_support(prev, 2).tolist() == [1, 3]
    assert kept_count(10, 0.75) == 3 and kept_count(10, 0.99) == 1


def test_error_feedback_sends_everything_eventually() -> None:
    rng = np.random.default_rng(0)
    updates = [rng.normal(size=64).astype(np.float32) for _ in range(5)]
    residual = np.zeros(64, dtype=np.float32)
    sent = np.zeros(64, dtype=np.float64)
    for r, u in enumerate(updates, start=1):
        support = random_support(64, 16, seed=1, round_no=r)
        values, residual = sparsify(u, support, residual)
        assert values.shape == (16,)
        sent += densify(values, support, 64)
    # Nothing is lost: what was sent plus what is still carried equals the sum of the updates.
    assert np.allclose(sent + residual, np.sum(updates, axis=0), atol=1e-5)
    values, res = sparsify(updates[0], random_support(64, 16, 1, 1), None)
    assert res is None and values.shape == (16,)
