"""A silo enclave's check that the global adapter its host hands in follows from the last aggregate.

With HE aggregation a silo that decrypts round ``r``'s sum knows the weighted mean update the
coordinator applied; with ``fedavg`` or ``fedprox`` (an SGD server step) and no pruning, round
``r + 1``'s global must then be round ``r``'s global plus ``server_lr`` times that mean. A global
that is not - altered by the silo's host or by the coordinator - is refused before the enclave
trains on it. Where the enclave cannot know the aggregate (masking: only the coordinator sums;
HE rounds it did not decrypt; ``fedadam``, whose server moments it does not hold; pruning) it
accepts any finite global of the right length, as a plain silo does (docs/adapter-in-tee.md).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from silotune.config.federation import FederationConfig
from silotune.errors import FederationError

__all__ = ["GlobalCheck"]

# float32 rounding of the coordinator's mean and SGD step: a few ulps of values below ~1.
_ABS_TOL = 1e-6


class GlobalCheck:
    """Remembers the previous round's global and decrypted mean; checks the next global."""

    def __init__(self, fed: FederationConfig) -> None:
        self.fed = fed
        self._trained: tuple[int, NDArray[np.float32]] | None = None  # (round, global)
        self._mean: tuple[int, NDArray[np.float64]] | None = None  # (round, weighted mean)

    @property
    def applies(self) -> bool:
        """Whether this job's server step is one the enclave can recompute."""
        return self.fed.strategy in ("fedavg", "fedprox") and not self.fed.pruning.enabled

    def trained_from(self, round_no: int, global_vec: NDArray[np.float32]) -> None:
        """Check ``global_vec`` for ``round_no`` (FederationError if altered), then keep it."""
        if self.applies and self._trained is not None and self._mean is not None:
            (prev_round, prev), (mean_round, mean) = self._trained, self._mean
            if prev_round == mean_round == round_no - 1 and mean.shape == global_vec.shape:
                step = np.float32(self.fed.effective_server_lr) * mean.astype(np.float32)
                expected = prev + step
                gap = float(np.abs(global_vec.astype(np.float64) - expected).max(initial=0.0))
                if gap > _ABS_TOL:
                    raise FederationError(
                        f"round {round_no}: the global adapter handed to this silo's enclave is "
                        "not round {0}'s global plus the aggregate this enclave decrypted "
                        f"(largest difference {gap:.3g}); the silo's host or the coordinator "
                        "altered it".format(round_no - 1)
                    )
        self._trained = (round_no, global_vec.astype(np.float32, copy=True))

    def decrypted(self, round_no: int, total: NDArray[np.float32], weights: list[float]) -> None:
        """Keep round ``round_no``'s mean: the decrypted sum of ``w_i x_i`` over the sum of ``w_i``."""
        share = float(sum(weights))
        if share > 0:
            self._mean = (round_no, total.astype(np.float64) / share)
