"""Update pruning onto a support shared by every silo of a round, with error feedback.

Every silo of a round sends only the values of its update on the same index set (the support), so
masked or encrypted sums stay aligned and the upload shrinks in proportion to the density. The
support never depends on one silo's data: it is drawn from a seed known to all parties, or taken
from the largest entries of the previous round's aggregate, which the coordinator already knows.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from numpy.typing import NDArray

from silotune.config.federation import PruningConfig
from silotune.crypto import prg

_SUPPORT_LABEL = b"silotune/federated/support"


def pruning_rate(cfg: PruningConfig, round_no: int) -> float:
    """Fraction of the update dropped in round `round_no` (1-based): linear ramp, clamped."""
    if not cfg.enabled or round_no < cfg.start_round:
        return 0.0
    if cfg.end_round == cfg.start_round:
        return cfg.target_rate
    progress = min(1.0, (round_no - cfg.start_round) / (cfg.end_round - cfg.start_round))
    return cfg.initial_rate + (cfg.target_rate - cfg.initial_rate) * progress


def kept_count(length: int, rate: float) -> int:
    """How many of `length` values a round with pruning `rate` keeps (at least one)."""
    return max(1, min(length, math.ceil(length * (1.0 - rate))))


def random_support(length: int, keep: int, seed: int, round_no: int) -> NDArray[np.int64]:
    """Sorted indices of `keep` of `length` values, the same for everyone with (seed, round_no).

    Ranks the values by an AES-CTR stream keyed from the job seed, so every silo and the
    coordinator compute the same set without sending it.
    """
    key = hashlib.sha256(_SUPPORT_LABEL + seed.to_bytes(8, "big")).digest()
    scores = prg.expand(key, length, label=_SUPPORT_LABEL, round_id=round_no)  # (L,) uint32
    order = np.argsort(scores, kind="stable")[:keep]
    return np.sort(order).astype(np.int64)


def topk_support(previous_aggregate: NDArray[np.float32], keep: int) -> NDArray[np.int64]:
    """Sorted indices of the `keep` largest-magnitude entries of the previous aggregate."""
    order = np.argsort(-np.abs(previous_aggregate), kind="stable")[:keep]
    return np.sort(order).astype(np.int64)


def sparsify(
    update: NDArray[np.float32],
    support: NDArray[np.int64] | None,
    residual: NDArray[np.float32] | None,
) -> tuple[NDArray[np.float32], NDArray[np.float32] | None]:
    """Error feedback: add the residual, keep the support's values, carry the rest.

    Parameters
    ----------
    update : numpy.ndarray
        Dense update (L,).
    support : numpy.ndarray or None
        Sorted indices to send; None sends everything.
    residual : numpy.ndarray or None
        What earlier rounds did not send (L,); None when error feedback is off.

    Returns
    -------
    (values, new_residual)
        ``values`` (len(support),) to upload; ``new_residual`` (L,), or None without feedback.
    """
    corrected = update + residual if residual is not None else update
    if support is None:
        return corrected.astype(np.float32), (
            np.zeros_like(update) if residual is not None else None
        )
    values = corrected[support].astype(np.float32)
    if residual is None:
        return values, None
    carried = corrected.astype(np.float32, copy=True)
    carried[support] = 0.0
    return values, carried


def densify(
    values: NDArray[np.float32], support: NDArray[np.int64] | None, length: int
) -> NDArray[np.float32]:
    """Scatter support values back into a dense vector of `length` (zeros elsewhere)."""
    if support is None:
        return values.astype(np.float32)
    dense = np.zeros(length, dtype=np.float32)
    dense[support] = values
    return dense
