"""Adapter placement enclave end to end: `silotune train` with a real (simulated) enclave process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from silotune.adapter_tee.runner import compare_with_plain
from silotune.adapters.peft_adapters import load_adapter, read_adapter_dir
from silotune.cli import app
from silotune.config import load_config
from silotune.dispatch import run_job
from silotune.enclave.base import EnclaveError
from silotune.enclave.platform import write_platform_key
from silotune.errors import CheckpointError
from silotune.models.loading import load_model

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "centralized-enclave-tiny.yaml"
SMALL = [
    "train.max_steps=3",
    "train.batch_size=4",
    "train.eval_every=3",
    "train.log_every=1",
    "data.max_length=64",
    "data.max_eval_examples=8",
]


@pytest.mark.slow
def test_cli_trains_in_the_enclave_and_saves_a_peft_adapter_equal_to_plain(tmp_path: Path) -> None:
    out = tmp_path / "enclave"
    args = ["train", str(RECIPE), *[a for s in SMALL for a in ("--set", s)]]
    result = CliRunner().invoke(app, [*args, "--set", f"output_dir={out}", "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapter_placement"] == "enclave" and summary["enclave_backend"] == "simulated"
    assert len(summary["enclave_measurement"]) == 64
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records] == ["train"] * 3 + ["validation", "test"]
    assert all(r["ocalls"] > 0 and r["bytes_sent"] > 0 for r in records[:3])

    # The same recipe with the adapter in the REE (the ordinary trainer) gives the same adapter.
    plain_cfg = load_config(RECIPE, [*SMALL, "adapter.placement=ree", f"output_dir={tmp_path}/p"])
    plain_summary = run_job(plain_cfg, progress=False)
    # Evaluation inside the enclave (masked forward passes) scores like the plain model.
    assert summary["test"] == pytest.approx(plain_summary["test"], abs=1e-6)
    config, enclave_tensors = read_adapter_dir(out / "adapter")
    _, plain_tensors = read_adapter_dir(tmp_path / "p" / "adapter")
    assert config["peft_type"] == "LORA" and enclave_tensors.keys() == plain_tensors.keys()
    diff = max(float((enclave_tensors[k] - plain_tensors[k]).abs().max()) for k in plain_tensors)
    assert diff <= 1e-5
    assert any(float(t.abs().max()) > 0 for k, t in enclave_tensors.items() if "lora_B" in k)
    # ... and it loads with plain PEFT onto the base model.
    base = load_model("tiny-llama", "cpu", "float32").model
    loaded = load_adapter(base, out / "adapter")
    assert torch.isfinite(loaded(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


@pytest.mark.slow
def test_compare_with_plain_measures_through_the_enclave_process() -> None:
    job = {
        "model": "tiny-llama",
        "adapter": {"type": "lora", "r": 4},
        "data": {"dataset": "fortunes-sample", "max_length": 64},
        "train": {"batch_size": 4, "lr": 5e-3},
        "enclave": {"mask_std": 1e4},
    }
    result = compare_with_plain(job, steps=2)
    assert result["enclave"] == "simulated" and result["steps"] == 2
    assert result["max_abs_diff"] <= 1e-5
    assert len(result["enclave_step_times"]) == 2 and result["enclave_step_s"] > 0


@pytest.mark.slow
def test_a_bad_data_set_fails_in_the_enclave_start_and_keeps_the_old_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    cfg = load_config(RECIPE, [*SMALL, f"output_dir={out}", f"data.dataset={tmp_path}/none"])
    with pytest.raises(EnclaveError, match="could not start: .*none"):
        run_job(cfg, overwrite=True, progress=False)
    assert (out / "summary.json").read_text() == "{}"


@pytest.mark.slow
def test_resume_continues_from_the_sealed_enclave_state(tmp_path: Path) -> None:
    private, _ = write_platform_key(tmp_path / "platform")
    out = tmp_path / "run"
    steps = ["train.max_steps=4", "train.eval_every=2", f"enclave.platform_key={private}"]
    cfg = load_config(RECIPE, [*SMALL, *steps, f"output_dir={out}"])
    run_job(cfg, progress=False)
    _, straight = read_adapter_dir(out / "adapter")
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-00000002", "step-00000004"]
    shutil.rmtree(checkpoints[-1])  # as if the run had stopped after step 2
    sealed = checkpoints[0] / "enclave_state.sealed"
    good = sealed.read_bytes()

    sealed.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # the REE tampers with the state
    with pytest.raises(CheckpointError, match="does not open in this enclave"):
        run_job(cfg, resume=True, progress=False)

    sealed.write_bytes(good)
    run_job(cfg, resume=True, progress=False)
    _, resumed = read_adapter_dir(out / "adapter")
    assert max(float((resumed[k] - straight[k]).abs().max()) for k in straight) <= 1e-5
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
