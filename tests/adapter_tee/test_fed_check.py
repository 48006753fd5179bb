"""A host that alters the global adapter (the installed aggregate) it hands its silo's enclave.

With HE the enclave decrypted the last aggregate itself and refuses a global that does not follow
from it; with masking it cannot tell, and the test pins down what the host then gets: a changed
starting point for its silo's training, and still nothing of the update it produces.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from silotune.adapter_tee.fed_check import GlobalCheck
from silotune.config.federation import FederationConfig
from silotune.errors import FederationError
from silotune.federated import silo
from tests.adapter_tee.fed_harness import fed_job, max_abs_corr, run_recorded, views

KEY = "a/arrays/global"


def _shift(round_no: int, partition: int = 0, delta: float = 0.01, value: float | None = None):
    """A host's tamper hook: change the global its enclave gets at the training stage of a round."""

    def tamper(p: int, action: str, meta: dict, values: dict) -> None:
        if p != partition or action not in (silo.MASK_SETUP, silo.HE_TRAIN):
            return
        if int(meta["configs"]["config"]["round"]) != round_no:
            return
        vec = np.frombuffer(values[KEY], dtype=np.float32).copy()
        vec[:] = value if value is not None else vec + delta
        values[KEY] = vec.tobytes()

    return tamper


def test_the_check_accepts_the_true_next_global_and_refuses_another() -> None:
    check = GlobalCheck(FederationConfig(silos=2, secure_aggregation="he"))
    prev = np.linspace(-1, 1, 50, dtype=np.float32)
    check.trained_from(1, prev)
    weights = [0.25, 0.75]
    total = np.full(50, 0.002, dtype=np.float32)  # sum of w_i x_i
    check.decrypted(1, total, weights)
    check.trained_from(2, prev + np.float32(0.002))
    check.trained_from(1, prev)  # a fresh start: nothing to compare with
    check.decrypted(1, total, weights)
    with pytest.raises(FederationError, match="altered it"):
        check.trained_from(2, prev + np.float32(0.0021))


@pytest.mark.parametrize(
    "fed",
    [
        {"strategy": "fedadam"},
        {"pruning": {"enabled": True}},
    ],
)
def test_the_check_stands_aside_where_it_cannot_recompute_the_server_step(fed: dict) -> None:
    check = GlobalCheck(FederationConfig(silos=2, secure_aggregation="he", **fed))
    prev = np.zeros(8, dtype=np.float32)
    check.trained_from(1, prev)
    check.decrypted(1, np.ones(8, dtype=np.float32), [1.0])
    check.trained_from(2, prev + 5)  # accepted: not checkable


def test_he_a_host_altering_the_installed_aggregate_is_caught(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = fed_job(tmp_path, "federation.secure_aggregation=he")
    with caplog.at_level(logging.WARNING), pytest.raises(FederationError, match="round 2 failed"):
        run_recorded(cfg, tamper=_shift(2))
    assert "the silo's host or the coordinator altered it" in caplog.text


def test_a_non_finite_global_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = fed_job(tmp_path, "federation.rounds=1")
    with caplog.at_level(logging.WARNING), pytest.raises(FederationError, match="round 1 failed"):
        run_recorded(cfg, tamper=_shift(1, value=float("nan")))
    assert "NaN or infinite" in caplog.text


def test_masking_a_host_altering_the_installed_aggregate_goes_unnoticed_and_learns_nothing(
    tmp_path: Path,
) -> None:
    """Documented limit: with masking the enclave never sees the aggregate, so it cannot check."""
    cfg = fed_job(tmp_path)
    summary, log = run_recorded(cfg, tamper=_shift(2))
    assert summary["rounds"] == 2  # the round completed with the altered starting point
    plain = cfg.model_copy(deep=True)
    plain.adapter.placement = "ree"
    tampered = [c for c in log if c.kind == "in" and c.partition == 0 and c.name == silo.MASK_SETUP]
    global_vec = tampered[-1].arrays()["arrays/global"].astype(np.float32)
    result, _, _ = silo.local_round(plain, 0, global_vec, 2, None, None)
    update = result.values.astype(np.float64)
    worst = 0.0
    for crossing in log:
        if crossing.partition != 0 or crossing.kind == "in":
            continue
        for array in crossing.arrays().values():
            worst = max(worst, *(max_abs_corr(v, update) for v in views(array)))
    assert worst < 0.1
