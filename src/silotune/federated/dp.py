"""Per-silo differential privacy: L2 clipping, Gaussian noise from a cryptographic PRG, accounting.

Each silo clips its round update to L2 norm ``C`` and adds ``N(0, (sigma * C)^2)`` to every
coordinate before it leaves the silo, so each released update is a Gaussian mechanism with noise
multiplier ``sigma`` and sensitivity ``C`` with respect to replacing all of that silo's data
(silo-level, local DP; secure aggregation only strengthens it). Epsilon comes from Opacus's RDP
accountant (``opacus.accountants.analysis.rdp``: the (sub)sampled Gaussian's Renyi DP composed
over rounds, converted to ``(epsilon, delta)`` with the tighter conversion of Balle et al. 2020).
Without sampling this is ``RDP(alpha) = T * alpha / (2 sigma^2)`` (Mironov 2017), the closed form
this module used before (tests/federated/test_dp.py compares the two). Sampling amplification
(``sample_rate < 1``) holds only against a party that does not know which silos took part in a
round; the coordinator draws the sample itself, so against it the unsampled figure holds.
"""

from __future__ import annotations

import secrets

import numpy as np
from numpy.typing import NDArray

from silotune.crypto import prg

_NOISE_LABEL = b"silotune/federated/dp-noise"
RDP_ORDERS = tuple([1.0 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512])


def clip_l2(update: NDArray[np.float32], clip_norm: float) -> tuple[NDArray[np.float32], float]:
    """Scale `update` down to L2 norm at most `clip_norm`; returns (clipped, original norm)."""
    norm = float(np.linalg.norm(update.astype(np.float64)))
    if norm <= clip_norm or norm == 0.0:
        return update.astype(np.float32), norm
    return (update * (clip_norm / norm)).astype(np.float32), norm


def gaussian_noise(length: int, std: float) -> NDArray[np.float32]:
    """`length` draws of N(0, std^2) by Box-Muller over an AES-CTR stream with a fresh secret seed.

    Not ``numpy.random``: a silo's noise must be unpredictable to everyone else. Floating-point
    Box-Muller has the known fine-grained weaknesses of textbook Gaussian samplers (Mironov 2012);
    see docs/federated.md.
    """
    seed = secrets.token_bytes(32)
    n_pairs = (length + 1) // 2
    words = prg.expand(seed, 4 * n_pairs, label=_NOISE_LABEL).astype(np.uint64)  # (4P,)
    # Two 53-bit uniforms per pair from four 32-bit words; u1 in (0, 1], u2 in [0, 1).
    hi = (words[0::4] << np.uint64(21)) ^ (words[1::4] >> np.uint64(11))
    lo = (words[2::4] << np.uint64(21)) ^ (words[3::4] >> np.uint64(11))
    u1 = (hi.astype(np.float64) + 1.0) / 2.0**53
    u2 = lo.astype(np.float64) / 2.0**53
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])
    return (z[:length] * std).astype(np.float32)


def privatize(
    update: NDArray[np.float32], clip_norm: float, noise_multiplier: float
) -> tuple[NDArray[np.float32], float]:
    """Clip to `clip_norm` and add Gaussian noise of std ``noise_multiplier * clip_norm``."""
    clipped, norm = clip_l2(update, clip_norm)
    return clipped + gaussian_noise(update.size, noise_multiplier * clip_norm), norm


def gaussian_epsilon(
    noise_multiplier: float, releases: int, delta: float, sample_rate: float = 1.0
) -> tuple[float, float]:
    """(epsilon, best RDP order) of ``releases`` Gaussian releases, each of a silo sampled with
    probability ``sample_rate`` (1 = every round, no amplification), by Opacus's RDP accountant."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    if releases <= 0:
        return 0.0, float("nan")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    orders = list(RDP_ORDERS)
    rdp = compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=releases, orders=orders
    )
    eps, order = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps), float(order)
