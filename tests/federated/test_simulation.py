"""`silotune train` on Flower's simulation engine (Ray), as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_silotune_train_runs_a_ckks_federation_on_the_simulation_engine(tmp_path: Path) -> None:
    recipe = yaml.safe_load((ROOT / "configs" / "federated-tiny.yaml").read_text())
    recipe["output_dir"] = str(tmp_path / "run")
    recipe["federation"].update({"rounds": 2, "local_steps": 2})
    recipe["data"]["max_eval_examples"] = 8
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run(
        [sys.executable, "-m", "silotune.cli", "train", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "federated" and summary["secure_aggregation"] == "he"
    assert summary["rounds"] == 2 and 0.0 <= summary["test"]["accuracy"] <= 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["silos"] for r in records if r["split"] == "train"] == [3, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000001",
        "step-00000002",
    ]
    # The final adapter is a PEFT folder that loads onto the base model.
    from peft import PeftModel

    from silotune.models.loading import load_model

    base = load_model("tiny-llama", "cpu", "float32").model
    model = PeftModel.from_pretrained(base, out / "adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())
    # A second run into the same folder is refused instead of overwriting it.
    again = subprocess.run(
        [sys.executable, "-m", "silotune.cli", "train", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode != 0 and "already holds a finished run" in again.stdout + again.stderr
