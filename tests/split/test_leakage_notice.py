"""Every split run's first log line states its settings' measured leakage and what stops it."""

from __future__ import annotations

import logging
import re

import pytest

from silotune.config import config_from_dict
from silotune.split import runner
from silotune.split.leakage_notice import _load, leakage_notice


def split_job(**split):
    return config_from_dict(
        {
            "mode": "split",
            "model": "tiny-llama",
            "data": {"dataset": "fortunes-sample"},
            "split": split,
        }  # fmt: skip
    )


def test_default_split_job_states_its_measured_leakage_and_the_enclave_fix() -> None:
    text = leakage_notice(split_job())
    row = next(
        r for r in _load()["rows"]
        if r["head_layers"] == 1 and r["noise_sigma"] == 0 and not r["trunk_in_enclave"]
        and r["activation_dtype"] == "float32" and not r["trained_steps"]
    )  # fmt: skip
    assert f"recover {row['leakage']:.0%}" in text
    assert "split.trunk_in_enclave: true stops it" in text


def test_unmeasured_settings_point_to_the_closest_measured_one() -> None:
    text = leakage_notice(split_job(head_layers=3))
    assert "was not measured as such" in text
    assert re.search(r"head_layers [24]\b", text)


def test_enclave_job_says_the_host_sees_ciphertext() -> None:
    assert "only ciphertext" in leakage_notice(split_job(trunk_in_enclave=True))


def test_train_split_logs_the_notice_first(caplog: pytest.LogCaptureFixture, tmp_path) -> None:
    cfg = split_job()
    cfg.output_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="silotune.split.runner"):
        with pytest.raises(Exception, match="resume"):
            runner.train_split(cfg, resume=True)  # refused right after the notice
    assert caplog.records[0].getMessage().startswith("Privacy: this split job")
