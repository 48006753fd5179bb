"""Tests for the `silotune` command line: help everywhere, export, train/eval end to end, clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
import typer.main
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from silotune.cli import app
from silotune.models.loading import load_model
from silotune.models.presets import PRESETS
from tests.conftest import assert_clean_error


def command_paths() -> list[list[str]]:
    """Every command and sub-command of the app (including ones other packages register)."""
    paths: list[list[str]] = []

    def walk(group: click.Command, prefix: list[str]) -> None:
        for name, sub in getattr(group, "commands", {}).items():
            paths.append([*prefix, name])
            walk(sub, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return paths


@pytest.mark.parametrize("path", [[], *command_paths()], ids=lambda p: " ".join(p) or "silotune")
def test_help_exits_zero(path: list[str]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_foundation_commands_are_registered() -> None:
    paths = {" ".join(p) for p in command_paths()}
    for name in ("train", "eval", "demo", "config", "bench", "data fortunes", "models export"):
        assert name in paths


def silotune(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "silotune.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
        timeout=300,
    )


def test_models_list_names_the_presets(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()] == list(PRESETS)


def test_models_export_loads_with_plain_transformers(tmp_path: Path, main_in_process) -> None:
    out = tmp_path / "tiny"
    result = silotune("models", "export", "tiny-llama", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ours = load_model("tiny-llama", "cpu", "float32")
    text = ["Fortune: A penny saved is a penny earned.\nCategory: food"]
    ids = tokenizer(text, return_tensors="pt")
    assert (
        ids["input_ids"].tolist() == ours.tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    )
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, ours.model(**ids).logits)
    assert tokenizer.pad_token_id == ours.tokenizer.pad_token_id

    again = main_in_process("models", "export", "tiny-llama", "--out", str(out), cwd=tmp_path)
    assert_clean_error(again, "not empty")
    assert_clean_error(
        main_in_process("models", "export", "nope", "--out", str(tmp_path / "x"), cwd=tmp_path),
        "neither a preset",
    )


RECIPE = """\
mode: centralized
model: tiny-llama
adapter: {type: lora, r: 4}
data: {dataset: fortunes-sample, task: classification, max_length: 64, max_eval_examples: 8}
train: {max_steps: 4, batch_size: 4, lr: 5.0e-3, seed: 0, eval_every: 2}
output_dir: run
"""


@pytest.mark.slow
def test_train_eval_resume_and_their_errors(tmp_path: Path, main_in_process) -> None:
    recipe = tmp_path / "job.yaml"
    recipe.write_text(RECIPE)
    run = tmp_path / "run"

    result = silotune("train", str(recipe), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(PEFT format)" in result.stderr
    summary = json.loads((run / "summary.json").read_text())

    # a finished run is not replaced without --overwrite
    assert_clean_error(main_in_process("train", str(recipe), cwd=tmp_path), "--overwrite")
    # resuming with a changed key is refused, naming the key
    changed = main_in_process(
        "train", str(recipe), "--resume", "--set", "train.lr=1e-2", cwd=tmp_path
    )
    assert_clean_error(changed, "train.lr")

    # eval with the adapter reproduces the run's test scores; its last line is JSON
    result = main_in_process("eval", str(recipe), "--adapter", str(run / "adapter"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores.pop("split") == "test"
    assert scores == pytest.approx(summary["test"], abs=1e-9)
    assert_clean_error(
        main_in_process("eval", str(recipe), "--split", "train", cwd=tmp_path), "--split must be"
    )
    assert_clean_error(
        main_in_process("eval", str(recipe), "--adapter", str(tmp_path / "none"), cwd=tmp_path),
        "has no adapter_config.json",
    )

    # a damaged checkpoint: one clear error on --resume, and the files stay as they were
    ckpt = run / "checkpoints" / "step-00000004"
    blob = bytearray((ckpt / "optimizer.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (ckpt / "optimizer.pt").write_bytes(bytes(blob))
    metrics_before = (run / "metrics.jsonl").read_bytes()
    result = main_in_process("train", str(recipe), "--resume", cwd=tmp_path)
    assert_clean_error(result, "optimizer.pt is corrupt")
    assert (ckpt / "optimizer.pt").read_bytes() == bytes(blob)
    assert (run / "metrics.jsonl").read_bytes() == metrics_before

    # a missing data folder
    missing = main_in_process(
        "train", str(recipe), "--overwrite", "--set", "data.dataset=nowhere", cwd=tmp_path
    )
    assert_clean_error(missing, "data.dataset 'nowhere'")
    assert (run / "summary.json").is_file()  # the old run survived the failed start
