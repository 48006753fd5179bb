"""The leakage measurement works: weak masks let a token-decoding REE win, the default ones do not."""

from __future__ import annotations

from silotune.adapter_tee.masked_leakage import step_leakage
from tests.conftest import FAST_JOB


def test_token_decoding_attack_wins_against_weak_masks_and_fails_against_default_ones() -> None:
    weak = step_leakage(FAST_JOB, 1e-3)
    assert weak["token_recovery"] > 0.95 and weak["max_abs_corr"] > 0.99
    strong = step_leakage(FAST_JOB, 1e4)
    assert strong["token_recovery"] <= strong["token_chance"]
    assert strong["max_abs_corr"] < 0.05 and strong["min_linear_rel_err"] > 0.998
