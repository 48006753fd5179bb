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


def _closed_form_epsilon(sigma: float, releases: int, delta: float) -> float:
    """The hand-written accountant dp.py used before: T alpha / (2 sigma^2) + ln(1/delta) / (alpha - 1)."""
    return min(
        releases * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1)
        for a in np.linspace(1.01, 200, 200_000)
    )


def test_accountant_agrees_with_the_closed_form_where_both_apply() -> None:
    # No sampling: Opacus's RDP is the closed form's; its (epsilon, delta) conversion is tighter
    # (Balle et al. 2020), by at most log(alpha) / (alpha - 1) - log(1 - 1 / alpha) at its order.
    from opacus.accountants.analysis.rdp import compute_rdp

    from silotune.federated.dp import RDP_ORDERS

    rdp = compute_rdp(q=1.0, noise_multiplier=1.3, steps=7, orders=list(RDP_ORDERS))
    assert np.allclose(rdp, [7 * a / (2 * 1.3**2) for a in RDP_ORDERS])
    for sigma, releases in ((1.0, 10), (0.8, 1), (2.0, 50), (5.0, 200)):
        eps, order = gaussian_epsilon(sigma, releases, 1e-5)
        closed = _closed_form_epsilon(sigma, releases, 1e-5)
        gap = math.log(order) / (order - 1) - math.log(1 - 1 / order)
        assert closed - gap - 0.05 <= eps <= closed + 1e-9
    assert gaussian_epsilon(1.0, 20, 1e-5)[0] > gaussian_epsilon(1.0, 10, 1e-5)[0]
    assert gaussian_epsilon(1.0, 10, 1e-5)[0] > gaussian_epsilon(2.0, 10, 1e-5)[0]
    assert gaussian_epsilon(1.0, 0, 1e-5)[0] == 0.0


def test_sampling_silos_amplifies_privacy() -> None:
    full = gaussian_epsilon(1.0, 10, 1e-5)[0]
    half = gaussian_epsilon(1.0, 10, 1e-5, sample_rate=0.5)[0]
    tenth = gaussian_epsilon(1.0, 10, 1e-5, sample_rate=0.1)[0]
    assert full > half > tenth > 0
    assert gaussian_epsilon(1.0, 10, 1e-5, sample_rate=1.0)[0] == full
    with pytest.raises(ValueError, match="sample_rate"):
        gaussian_epsilon(1.0, 10, 1e-5, sample_rate=0.0)


def test_coordinator_reports_the_sampled_epsilon_only_when_it_samples() -> None:
    from types import SimpleNamespace

    from silotune.config import config_from_dict
    from silotune.federated.coordinator import Coordinator

    def report(**federation: object) -> dict:
        dp = {"enabled": True, "clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}
        cfg = config_from_dict(
            {"mode": "federated", "model": "tiny-llama", "federation": {**federation, "dp": dp}}
        )
        return Coordinator._epsilon(SimpleNamespace(fed=cfg.federation), 10)  # type: ignore[arg-type]

    everyone = report(silos=4, min_silos=2)
    assert everyone["epsilon"] == gaussian_epsilon(1.0, 10, 1e-5)[0]
    assert "epsilon_sampled" not in everyone and everyone["accountant"] == "opacus-rdp"
    half = report(silos=4, min_silos=2, fraction=0.5)
    assert half["sample_rate"] == 0.5 and half["epsilon"] == everyone["epsilon"]
    assert half["epsilon_sampled"] == gaussian_epsilon(1.0, 10, 1e-5, 0.5)[0] < half["epsilon"]
