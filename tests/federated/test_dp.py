"""Per-silo clipping, Gaussian noise and the RDP epsilon."""

from __future__ import annotations

import math

import numpy as np
import pytest

from silotune.federated.dp import clip_l2, gaussian_epsilon, gaussian_noise, privatize


def test_clip_scales_down_only_above_the_bound() -> None:
    u = np.array([3.0, 4.0], dtype=np.float32)
    clipped, norm = clip_l2(u, 1.0)
    assert norm == pytest.approx(5.0) and np.linalg.norm(clipped) == pytest.approx(1.0)
    same, _ = clip_l2(u, 10.0)
    assert np.array_equal(same, u)


def test_noise_has_the_requested_std_and_is_fresh() -> None:
    z = gaussian_noise(100_001, 0.5)
    assert z.shape == (100_001,)
    assert abs(float(z.mean())) < 0.01 and float(z.std()) == pytest.approx(0.5, rel=0.02)
    assert not np.array_equal(z[:10], gaussian_noise(10, 0.5))
    noisy, _ = privatize(np.zeros(10_000, dtype=np.float32), clip_norm=2.0, noise_multiplier=1.5)
    assert float(noisy.std()) == pytest.approx(3.0, rel=0.05)


def test_epsilon_matches_the_gaussian_rdp_closed_form() -> None:
    # sigma = 1, T = 10, delta = 1e-5: min over alpha of 5 alpha + ln(1e5) / (alpha - 1).
    eps, order = gaussian_epsilon(1.0, 10, 1e-5)
    best = min(5 * a + math.log(1e5) / (a - 1) for a in np.linspace(1.01, 40, 40000))
    assert eps == pytest.approx(best, rel=0.01) and 2.0 < order < 3.0
    assert gaussian_epsilon(1.0, 20, 1e-5)[0] > eps > gaussian_epsilon(2.0, 10, 1e-5)[0]
    assert gaussian_epsilon(1.0, 0, 1e-5)[0] == 0.0
