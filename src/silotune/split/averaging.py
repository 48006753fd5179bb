"""Weighted averaging of adapter tensors across silos (or trunk replicas), by example count.

Split training averages the silo-side adapters every ``split.sync_every`` steps. The silo calls
the :class:`AdapterAverager` that :func:`silotune.split.silo.make_averager` picks from
``split.secure_averaging``: ``masking`` (default,
:class:`~silotune.split.secure_averaging.MaskingAverager`: pairwise-mask secure aggregation, the
coordinator learns only the average) or ``none`` (:class:`~silotune.split.silo.CoordinatorAverager`:
the coordinator receives each silo's adapter and runs :func:`weighted_average`). Another averager
only has to implement :meth:`AdapterAverager.average`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

__all__ = ["AdapterAverager", "weighted_average"]


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Average tensors with the same names, weighting state ``i`` by ``weights[i]``.

    Parameters
    ----------
    states
        One mapping of name -> tensor per party; all with the same names and shapes.
    weights
        Non-negative weights (e.g. training examples per silo) with a positive sum.

    Returns
    -------
    dict
        ``sum_i (w_i / sum w) * state_i`` per name, in float32 and then the first state's dtype.
        A single state is returned unchanged (bit for bit).
    """
    if not states or len(states) != len(weights):
        raise ValueError(
            f"weighted_average needs one weight per state, got {len(states)} states and "
            f"{len(weights)} weights."
        )
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}.")
    names = set(states[0])
    for state in states[1:]:
        if set(state) != names:
            missing = sorted(names ^ set(state))[:3]
            raise ValueError(f"states hold different tensors (e.g. {missing}); cannot average.")
    if len(states) == 1:
        return {name: tensor.detach().clone() for name, tensor in states[0].items()}
    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    for name in states[0]:
        acc = torch.zeros_like(states[0][name], dtype=torch.float32)
        for state, weight in zip(states, weights, strict=True):
            acc += state[name].detach().float() * (weight / total)
        out[name] = acc.to(states[0][name].dtype)
    return out


class AdapterAverager(Protocol):
    """How a silo's adapter tensors are averaged with the other silos' at a sync step."""

    def average(
        self, step: int, state: Mapping[str, torch.Tensor], examples: int
    ) -> dict[str, torch.Tensor]:
        """Return the average of every live silo's ``state`` (weighted by ``examples``).

        Parameters
        ----------
        step
            The optimizer step just finished (1-based), the same at every silo.
        state
            This silo's adapter tensors (PEFT names).
        examples
            This silo's training examples (the averaging weight).
        """
        ...
