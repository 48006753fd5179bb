"""The offline mask pool: factors equal z W, every row and check vector is handed out once."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from silotune.adapter_tee.mask_pool import LINEAR, LINEAR_T, MaskPool
from silotune.adapter_tee.masked_stream import MaskStream
from silotune.errors import MaskReuseError

WEIGHTS = {
    "q": torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
    "k": torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)),
}


def _pool(rows: int = 5) -> MaskPool:
    return MaskPool(MaskStream(bytes(32)), WEIGHTS.__getitem__, rows)


def test_factors_are_the_masks_through_the_frozen_weights() -> None:
    pool = _pool()
    fwd = pool.take(LINEAR, ["q", "k"], 3)
    assert fwd.z.shape == (3, 4) and fwd.z.dtype == torch.float64
    torch.testing.assert_close(fwd.factors["q"], fwd.z @ WEIGHTS["q"].T, rtol=0, atol=1e-12)
    torch.testing.assert_close(fwd.factors["k"], fwd.z @ WEIGHTS["k"].T, rtol=0, atol=1e-12)
    bwd = pool.take(LINEAR_T, ["q"], 2)
    assert bwd.z.shape == (2, 6)
    torch.testing.assert_close(bwd.factors["q"], bwd.z @ WEIGHTS["q"], rtol=0, atol=1e-12)
    v, u = pool.check_pair(LINEAR, "q")
    torch.testing.assert_close(u, v @ WEIGHTS["q"], rtol=0, atol=1e-12)


def test_each_row_is_handed_out_once_in_disjoint_ranges() -> None:
    pool = _pool(rows=4)
    taken = [pool.take(LINEAR, ["q"], n) for n in (3, 1, 4, 2, 7)]
    starts = [t.first_row for t in taken]
    assert starts == [0, 3, 4, 8, 10]  # consecutive: the cursor only moves forward
    assert pool.served(LINEAR, "q") == 17
    rows = torch.cat([t.z for t in taken])
    # No two rows of the whole sequence are the same mask (refills included).
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0] == 17
    # Sites do not share rows either.
    other = pool.take(LINEAR_T, ["q"], 3)
    assert not any(torch.equal(a, b) for a in other.z for b in rows)


def test_a_served_row_is_refused() -> None:
    pool = _pool()
    pool.take(LINEAR, ["q"], 3)
    site = pool._sites[(LINEAR, "q")]
    with pytest.raises(MaskReuseError, match="cursor is at 3; a precomputed mask is used once"):
        pool._serve(site, 0, 2, ["q"])  # what a pool that rewound would do


def test_fill_precomputes_so_that_a_step_needs_no_refill() -> None:
    pool = _pool(rows=1)
    pool.take(LINEAR, ["q"], 2)  # learns the site
    pool.check_pair(LINEAR, "q")
    first = pool.take_stats()
    assert first.refills == 2 and first.inline_s > 0
    pool.fill(6)
    filled = pool.take_stats()
    assert filled.rows_drawn == 6 and filled.refills == 0 and filled.inline_s == 0
    assert filled.preprocess_s > 0 and filled.peak_bytes >= pool.nbytes() > 0
    pool.take(LINEAR, ["q"], 6)
    pool.check_pair(LINEAR, "q")
    assert pool.take_stats().refills == 0


def test_a_layer_joining_a_site_gets_factors_for_the_rows_already_drawn() -> None:
    pool = _pool(rows=4)
    pool.take(LINEAR, ["q"], 1)  # first pass: q's followers are not known yet
    grown = pool.take(LINEAR, ["q", "k"], 3)
    assert grown.first_row == 1
    torch.testing.assert_close(grown.factors["k"], grown.z @ WEIGHTS["k"].T, rtol=0, atol=1e-12)


def test_check_vectors_are_used_once() -> None:
    pool = _pool()
    pairs = [pool.check_pair(LINEAR_T, "k") for _ in range(5)]
    vs = torch.stack([v for v, _ in pairs])
    assert torch.unique(vs, dim=0).shape[0] == 5


def test_all_randomness_comes_from_unused_keystream() -> None:
    pool = _pool(rows=3)
    blocks: list[range] = []
    draw = pool.masks.gaussian

    def spy(shape: tuple[int, ...]) -> Any:
        mask = draw(shape)
        blocks.append(range(mask.first_block, mask.first_block + mask.n_blocks))
        return mask

    pool.masks.gaussian = spy  # type: ignore[method-assign]
    for _ in range(4):
        pool.fill()
        pool.take(LINEAR, ["q", "k"], 3)
        pool.take(LINEAR_T, ["k"], 2)
        pool.check_pair(LINEAR, "q")
    used = [b for r in blocks for b in r]
    assert len(used) == len(set(used)) > 0


def test_a_bad_take_is_refused() -> None:
    with pytest.raises(ValueError, match="bad site"):
        _pool().take("matmul", ["q"], 1)
    with pytest.raises(ValueError, match="rows > 0"):
        _pool(rows=0)
