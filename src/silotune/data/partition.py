"""Split one dataset's indices across silos: IID, label-skewed (Dirichlet), or whole groups per silo.

Implemented with a seeded ``numpy.random.Generator`` (partitioning is not security code) rather
than flwr-datasets' ``IidPartitioner``/``DirichletPartitioner``: those work on a
``datasets.Dataset`` and hand back dataset views (indices only through private attributes);
``IidPartitioner`` cuts contiguous shards without shuffling, and ``DirichletPartitioner`` cuts
each class in dataset order (it shuffles only after assignment), warns on every retry and gives
up after a fixed 10 tries. Here each class is shuffled before it is cut, retries are bounded by
an argument, and the result is plain index lists.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from silotune.errors import DataError

logger = logging.getLogger(__name__)


def _check_n_parts(n_parts: int, n_examples: int) -> None:
    """Reject a part count below 1 or above the number of examples."""
    if isinstance(n_parts, bool) or not isinstance(n_parts, int) or n_parts < 1:
        raise ValueError(f"n_parts must be an integer >= 1, got {n_parts!r}.")
    if n_parts > n_examples:
        raise DataError(
            f"Cannot split {n_examples} examples into {n_parts} parts; use at most "
            f"{n_examples} parts or more data."
        )


def partition_iid(n_examples: int, n_parts: int, seed: int) -> list[list[int]]:
    """Split ``range(n_examples)`` uniformly at random into `n_parts` near-equal parts.

    Parameters
    ----------
    n_examples : int
        Number of examples to split.
    n_parts : int
        Number of parts (silos), between 1 and `n_examples`.
    seed : int
        Seed; the same arguments always give the same parts.

    Returns
    -------
    list[list[int]]
        `n_parts` sorted index lists whose sizes differ by at most one; every index appears in
        exactly one part.
    """
    if n_examples < 0:
        raise ValueError(f"n_examples must be >= 0, got {n_examples}.")
    _check_n_parts(n_parts, n_examples)
    order = np.random.default_rng(seed).permutation(n_examples)
    return [sorted(part.tolist()) for part in np.array_split(order, n_parts)]


def partition_dirichlet(
    labels: Sequence[str],
    n_parts: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_retries: int = 100,
) -> list[list[int]]:
    """Split example indices into label-skewed parts, class by class, with Dirichlet proportions.

    For every class (in sorted label order) its indices are shuffled and cut into `n_parts`
    pieces whose proportions are drawn from ``Dirichlet(alpha, ..., alpha)``; piece ``j`` goes to
    part ``j``. Small `alpha` gives each part few classes; large `alpha` approaches IID. The
    whole draw is repeated until every part holds at least `min_size` examples.

    Parameters
    ----------
    labels : sequence of str
        The label of each example; index ``i`` refers to ``labels[i]``.
    n_parts : int
        Number of parts (silos), >= 1.
    alpha : float
        Dirichlet concentration, > 0.
    seed : int
        Seed; the same arguments always give the same parts.
    min_size : int
        Minimum examples per part.
    max_retries : int
        Number of redraws allowed before giving up.

    Returns
    -------
    list[list[int]]
        `n_parts` sorted index lists; every index appears in exactly one part.

    Raises
    ------
    ValueError
        If `n_parts`, `alpha`, `min_size` or `max_retries` is out of range.
    DataError
        If the data cannot give every part `min_size` examples, or no draw within
        `max_retries` redraws did.
    """
    n_examples = len(labels)
    _check_n_parts(n_parts, n_examples)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}.")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}.")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}.")
    if min_size * n_parts > n_examples:
        raise DataError(
            f"Cannot give each of {n_parts} parts at least {min_size} of {n_examples} examples; "
            "lower min_size or n_parts."
        )

    label_array = np.asarray([str(label) for label in labels])
    classes = [np.flatnonzero(label_array == value) for value in sorted(set(label_array))]
    rng = np.random.default_rng(seed)
    for attempt in range(max_retries + 1):
        parts: list[list[int]] = [[] for _ in range(n_parts)]
        for members in classes:
            members = rng.permutation(members)
            proportions = rng.dirichlet(np.full(n_parts, float(alpha)))
            # cut points: floor of the cumulative share of this class, last piece takes the rest
            cuts = np.floor(np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for part, piece in zip(parts, np.split(members, cuts), strict=True):
                part.extend(piece.tolist())
        smallest = min(len(part) for part in parts)
        if smallest >= min_size:
            if attempt:
                logger.debug("dirichlet partition met min_size after %d redraws", attempt)
            return [sorted(part) for part in parts]
    raise DataError(
        f"No Dirichlet partition with alpha={alpha} gave all {n_parts} parts at least "
        f"{min_size} examples in {max_retries + 1} draws; raise alpha or lower min_size/n_parts."
    )


def partition_groups(groups: Sequence[str], n_parts: int) -> list[list[int]]:
    """Give each part whole groups (domains): sorted group ``k`` goes to part ``k % n_parts``.

    Parameters
    ----------
    groups : sequence of str
        The group (e.g. the ``domain`` of an instruction record) of each example.
    n_parts : int
        Number of parts (silos), between 1 and the number of distinct groups.

    Returns
    -------
    list[list[int]]
        `n_parts` sorted index lists; every index appears in exactly one part, and no group is
        split between parts. With as many parts as groups, each part holds exactly one group.

    Raises
    ------
    DataError
        If there are fewer distinct groups than parts.
    """
    _check_n_parts(n_parts, len(groups))
    names = sorted({str(g) for g in groups})
    if len(names) < n_parts:
        raise DataError(
            f"Cannot give each of {n_parts} parts a whole group: the data has {len(names)} "
            f"({', '.join(repr(n) for n in names)}); use at most {len(names)} parts."
        )
    owner = {name: k % n_parts for k, name in enumerate(names)}
    parts: list[list[int]] = [[] for _ in range(n_parts)]
    for index, group in enumerate(groups):
        parts[owner[str(group)]].append(index)
    return parts
