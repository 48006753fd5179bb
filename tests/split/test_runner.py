"""`silotune serve` / `silotune join` across threads, and `silotune train` with mode split."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from silotune.dispatch import run_job
from silotune.errors import CheckpointError, ConfigError
from silotune.eval.evaluate import evaluate
from silotune.models.loading import load_model
from silotune.split import runner
from silotune.train.job import build_job
from tests.split.conftest import serve_and_join, split_cfg


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_and_join_train_and_save_a_complete_adapter(keys_dir, tls_dir, tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    common = {"address": address, "keys_dir": keys_dir, "tls_dir": tls_dir, "silos": 2}
    coordinator = split_cfg(train={"max_steps": 2}, **common)
    coordinator.output_dir = tmp_path / "coordinator"
    silos = []
    for i in range(2):
        cfg = split_cfg(train={"max_steps": 2}, **common)
        cfg.output_dir = tmp_path / f"silo-{i}"
        silos.append(cfg)
    results = serve_and_join(coordinator, silos)
    summary = results["coordinator"]
    assert summary["trunk_steps"] == 2
    assert sorted(s["outcome"] for s in summary["sessions"]) == ["finished", "finished"]
    trunk = load_file(tmp_path / "coordinator" / "trunk_adapter.safetensors")
    adapter = load_file(tmp_path / "silo-0" / "adapter" / "adapter_model.safetensors")
    assert trunk.keys() < adapter.keys()
    for name, tensor in trunk.items():
        assert torch.equal(adapter[name], tensor), name
    assert 0.0 <= results[0]["test"]["accuracy"] <= 1.0


def test_join_without_keys_names_the_missing_key(tmp_path):
    cfg = split_cfg()
    cfg.output_dir = tmp_path / "silo"
    with pytest.raises(ConfigError, match="split.keys_dir is not set"):
        runner.join(cfg, "silo-0")


def test_split_resume_without_a_checkpoint_says_so(tmp_path):
    cfg = split_cfg()
    cfg.output_dir = tmp_path / "run"
    with pytest.raises(CheckpointError, match="--resume: .* holds no checkpoint"):
        run_job(cfg, resume=True)


@pytest.mark.slow
def test_train_mode_split_resumes_coordinator_and_silos(tmp_path):
    """`silotune train --resume` in split mode: 2 steps, then the same run continued to 4."""
    train = {"max_steps": 2, "scheduler": "constant", "log_every": 1, "eval_every": 1000}
    cfg = split_cfg(train=train, silos=2, server_mode="client-batching", sync_every=2)
    cfg.output_dir = tmp_path / "run"
    run_job(cfg, progress=False)
    assert (cfg.output_dir / "checkpoints" / "step-00000002").is_dir()  # the trunk's
    longer = cfg.model_copy(deep=True)
    longer.train.max_steps = 4
    summary = run_job(longer, resume=True, progress=False)
    assert summary["split"]["failed_silos"] == []
    assert summary["split"]["trunk_steps"] == 4  # 2 restored + 2 more
    lines = [json.loads(x) for x in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = sorted(r["step"] for r in lines if r["split"] == "train" and r["silo"] == "silo-1")
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_train_mode_split_runs_silos_as_processes(tmp_path):
    cfg = split_cfg(
        train={"max_steps": 4, "eval_every": 2, "log_every": 2},
        silos=2,
        server_mode="client-batching",
        sync_every=2,
    )
    cfg.output_dir = tmp_path / "run"
    summary = run_job(cfg, progress=False)
    assert summary["split"]["failed_silos"] == []
    assert summary["split"]["trunk_steps"] == 4
    lines = [json.loads(x) for x in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert {(r["silo"], r["split"]) for r in lines} >= {
        ("silo-0", "train"),
        ("silo-1", "train"),
        ("silo-0", "validation"),
        ("silo-0", "test"),
    }
    # The saved adapter is a complete PEFT adapter: loaded onto the whole base model it scores
    # what the split pipeline scored.
    base = load_model("tiny-llama").model
    model = PeftModel.from_pretrained(base, cfg.output_dir / "adapter")
    job = build_job(cfg.model_copy(update={"mode": "centralized"}))
    scores = evaluate(model, job.task, job.splits.test, 16, torch.device("cpu"))
    assert scores["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    assert (cfg.output_dir / "summary.json").is_file()
