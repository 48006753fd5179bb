"""Adapter in the TEE: fresh masks stop the REE's token decoding; a reused mask hands it the tokens."""

from __future__ import annotations

from silotune.adapter_tee.masked_linear import LinearOffload
from silotune.attacks.tee_masks import reused_masks, tee_leakage
from tests.conftest import FAST_JOB


def test_fresh_masks_at_the_default_std_leave_the_ree_at_chance() -> None:
    row = tee_leakage(FAST_JOB, 1e4, reuse=False)
    assert row["leakage"] <= row["chance"]


def test_a_reused_mask_lets_the_ree_strip_it_and_decode_most_tokens() -> None:
    row = tee_leakage(FAST_JOB, 1e4, reuse=True)
    assert row["naive_leakage"] <= row["chance"]  # the plain decoding still fails...
    assert row["leakage"] > 0.6 > row["chance"] * 5  # ...stripping the shared mask does not


def test_the_reuse_hook_is_confined_to_its_block() -> None:
    original = LinearOffload._mask
    with reused_masks():
        assert LinearOffload._mask is not original
    assert LinearOffload._mask is original
