"""`silotune enclave measure` and `silotune enclave platform-key`: output and one-line errors."""

from __future__ import annotations

import logging
import sys

import pytest
import yaml

from silotune.cli import main
from silotune.config import load_config
from silotune.crypto.identity import IdentityKey, PublicIdentity
from silotune.enclave.measure import measure
from silotune.split.keys import load_enrollment, write_job_keys
from silotune.split.trunk_app import trunk_app_config


@pytest.fixture
def run(capsys, monkeypatch):
    root = logging.getLogger()
    saved = root.handlers[:]

    def invoke(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["silotune", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main()
        out, err = capsys.readouterr()
        return int(info.value.code or 0), out, err

    yield invoke
    root.handlers[:] = saved


def test_measure_prints_what_a_silo_computes(run, tmp_path):
    write_job_keys(tmp_path / "keys", ["silo-0", "silo-1"])
    recipe = {
        "mode": "split",
        "model": "tiny-llama",
        "split": {"trunk_in_enclave": True, "keys_dir": str(tmp_path / "keys")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, out, _ = run("enclave", "measure", str(path))
    assert code == 0
    cfg = load_config(path)
    expected = measure("trunk", trunk_app_config(cfg, load_enrollment(cfg.split.keys_dir)))
    assert out.strip() == expected.hex()
    # Machine-local settings and evaluation bookkeeping do not change it; the learning rate does.
    for setting in ("split.address=10.0.0.1:1", "train.eval_every=7", "output_dir=elsewhere"):
        assert run("enclave", "measure", str(path), "--set", setting)[1] == out, setting
    assert run("enclave", "measure", str(path), "--set", "train.lr=0.5")[1] != out


def test_measure_without_an_enrollment_is_one_line_error(run, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"mode": "split", "split": {"keys_dir": str(tmp_path)}}))
    code, _, err = run("enclave", "measure", str(path))
    assert code == 1 and "enrollment.json is missing" in err and "Traceback" not in err


def test_platform_key_writes_a_pair_and_never_overwrites(run, tmp_path):
    code, _, err = run("enclave", "platform-key", "--out", str(tmp_path / "p"))
    assert code == 0 and "SIMULATED" in err
    key = IdentityKey.load(tmp_path / "p" / "platform.key")
    assert PublicIdentity.load(tmp_path / "p" / "platform.pub") == key.public
    code, _, err = run("enclave", "platform-key", "--out", str(tmp_path / "p"))
    assert code == 1 and "never overwritten" in err
