"""Per-silo differential privacy: L2 clipping, Gaussian noise from a cryptographic PRG, accounting.

Each silo clips its round update to L2 norm ``C`` and adds ``N(0, (sigma * C)^2)`` to every
coordinate before it leaves the silo, so each released update is a Gaussian mechanism with noise
multiplier ``sigma`` and sensitivity ``C`` with respect to replacing all of that silo's data
(silo-level, local DP; secure aggregation only strengthens it). Over ``T`` rounds the Renyi DP of
the Gaussian mechanism composes additively, ``RDP(alpha) = T * alpha / (2 sigma^2)`` (Mironov 2017,
Prop. 7 with sensitivity C), and converts to ``epsilon = min_alpha RDP(alpha) + log(1/delta) /
(alpha - 1)`` (Mironov 2017, Prop. 3). No privacy amplification by silo sampling is claimed, so
the figure is an upper bound. Google's ``dp-accounting`` (which Flower's ``RdpAccountant`` wraps)
is not installed here; this closed form is what it computes for this mechanism without sampling.
"""

from __future__ import annotations

import math
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


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> tuple[float, float]:
    """(epsilon, best RDP order) of `releases` Gaussian releases, no sampling amplification."""
    if releases <= 0:
        return 0.0, float("nan")
    log_inv_delta = math.log(1.0 / delta)
    best = min(
        (releases * a / (2.0 * noise_multiplier**2) + log_inv_delta / (a - 1.0), a)
        for a in RDP_ORDERS
    )
    return best[0], float(best[1])
