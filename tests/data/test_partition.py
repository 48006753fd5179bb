"""Tests for silotune.data.partition: determinism, coverage and Dirichlet label skew."""

from collections import Counter

import numpy as np
import pytest

from silotune.data.partition import partition_dirichlet, partition_iid
from silotune.errors import DataError

LABELS = [name for name in ("food", "linux", "politics", "startrek") for _ in range(100)]


def _assert_exact_cover(parts: list[list[int]], n_examples: int) -> None:
    flat = [index for part in parts for index in part]
    assert sorted(flat) == list(range(n_examples))  # every index exactly once


def _label_skew(parts: list[list[int]], labels: list[str]) -> float:
    """Mean total-variation distance between each part's label distribution and the global one."""
    classes = sorted(set(labels))
    overall = np.array([labels.count(c) for c in classes]) / len(labels)
    distances = []
    for part in parts:
        counts = Counter(labels[i] for i in part)
        local = np.array([counts[c] for c in classes]) / len(part)
        distances.append(0.5 * np.abs(local - overall).sum())
    return float(np.mean(distances))


def test_iid_covers_every_index_once_with_balanced_sizes():
    parts = partition_iid(103, 4, seed=0)
    _assert_exact_cover(parts, 103)
    assert sorted(len(part) for part in parts) == [25, 26, 26, 26]
    assert all(part == sorted(part) for part in parts)


def test_iid_is_deterministic_by_seed_and_shuffled():
    assert partition_iid(50, 3, seed=7) == partition_iid(50, 3, seed=7)
    assert partition_iid(50, 3, seed=7) != partition_iid(50, 3, seed=8)
    assert partition_iid(50, 2, seed=7)[0] != list(range(25))  # not contiguous shards


def test_iid_single_part_is_everything():
    assert partition_iid(5, 1, seed=0) == [[0, 1, 2, 3, 4]]


def test_iid_argument_errors():
    with pytest.raises(ValueError, match="n_parts must be an integer >= 1"):
        partition_iid(10, 0, seed=0)
    with pytest.raises(DataError, match="Cannot split 3 examples into 4 parts"):
        partition_iid(3, 4, seed=0)


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_dirichlet_covers_every_index_once_and_is_deterministic(alpha):
    parts = partition_dirichlet(LABELS, 5, alpha=alpha, seed=3, min_size=5)
    _assert_exact_cover(parts, len(LABELS))
    assert min(len(part) for part in parts) >= 5
    assert partition_dirichlet(LABELS, 5, alpha=alpha, seed=3, min_size=5) == parts
    assert partition_dirichlet(LABELS, 5, alpha=alpha, seed=4, min_size=5) != parts


def test_dirichlet_skew_grows_as_alpha_shrinks():
    def mean_skew(alpha: float) -> float:
        runs = [partition_dirichlet(LABELS, 4, alpha, seed=s, min_size=1) for s in range(10)]
        return float(np.mean([_label_skew(parts, LABELS) for parts in runs]))

    skew = {alpha: mean_skew(alpha) for alpha in (100.0, 1.0, 0.1)}
    assert skew[100.0] < 0.1  # near IID
    assert skew[100.0] < skew[1.0] < skew[0.1]
    assert skew[0.1] > 0.4  # most parts dominated by one or two classes


def test_dirichlet_min_size_is_enforced_by_redrawing():
    parts = partition_dirichlet(LABELS, 8, alpha=0.3, seed=0, min_size=20)
    assert min(len(part) for part in parts) >= 20
    _assert_exact_cover(parts, len(LABELS))


def test_dirichlet_gives_up_with_a_clear_error():
    with pytest.raises(DataError, match=r"alpha=0.01 .* at least 75 examples in 3 draws"):
        partition_dirichlet(LABELS, 5, alpha=0.01, seed=0, min_size=75, max_retries=2)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"alpha": 0.0}, ValueError, "alpha must be a finite number > 0"),
        ({"alpha": float("nan")}, ValueError, "alpha must be a finite number > 0"),
        ({"n_parts": 0}, ValueError, "n_parts must be an integer >= 1"),
        ({"min_size": -1}, ValueError, "min_size must be >= 0"),
        ({"n_parts": 401}, DataError, "Cannot split 400 examples into 401 parts"),
        ({"min_size": 101}, DataError, "at least 101 of 400 examples"),
    ],
)
def test_dirichlet_argument_errors(kwargs, error, message):
    arguments = {"n_parts": 4, "alpha": 1.0, "seed": 0, **kwargs}
    with pytest.raises(error, match=message):
        partition_dirichlet(LABELS, **arguments)
