"""Tests for silotune.train.checkpoint: exact round trip, atomic writes, rotation, damage detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from silotune.adapters.peft_adapters import adapter_state, attach_adapter
from silotune.config import AdapterConfig, TrainConfig
from silotune.data.tasks import Encoded
from silotune.errors import CheckpointError
from silotune.models.presets import build_tiny_llama
from silotune.train.checkpoint import (
    STATE_FILE,
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from silotune.train.loop import BatchStream, make_optimizer, make_scheduler, train_step

CFG = TrainConfig(lr=1e-2, scheduler="linear", warmup_steps=1, max_steps=10, batch_size=2)


def fresh(r: int = 4, seed: int = 0) -> tuple[PeftModel, torch.optim.Optimizer, object]:
    model = attach_adapter(build_tiny_llama(0)[0], AdapterConfig(r=r, dropout=0.2), seed=seed)
    optimizer = make_optimizer(model, CFG)
    return model, optimizer, make_scheduler(optimizer, CFG)


def stream() -> BatchStream:
    data = [Encoded([5 + i, 9, 30 + i, 2], [-100, 9, 30 + i, 2]) for i in range(6)]
    return BatchStream(data, batch_size=2, seed=0, pad_id=1)


def test_round_trip_restores_adapter_optimizer_scheduler_and_rng(tmp_path: Path) -> None:
    model, optimizer, scheduler = fresh()
    batches = stream()
    for step in range(2):
        train_step(model, batches, step, optimizer, scheduler, CFG, torch.device("cpu"))
    path = save_checkpoint(tmp_path, 2, model, optimizer, scheduler, extra={"note": "x"})
    assert path == tmp_path / "checkpoints" / "step-00000002"
    with torch.random.fork_rng(devices=[]):
        expected_rng = torch.rand(3)
    # continue the original for one step: the reference
    train_step(model, batches, 2, optimizer, scheduler, CFG, torch.device("cpu"))
    want = adapter_state(model)

    other, other_opt, other_sched = fresh(seed=1)  # different initial adapter
    torch.manual_seed(123)
    state = load_checkpoint(path, other, other_opt, other_sched)
    assert state["step"] == 2 and state["extra"] == {"note": "x"}
    assert other_sched.last_epoch == 2
    assert torch.equal(torch.rand(3), expected_rng)  # RNG restored (dropout masks follow)
    load_checkpoint(path, other, other_opt, other_sched)
    train_step(other, batches, 2, other_opt, other_sched, CFG, torch.device("cpu"))
    got = adapter_state(other)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-7, rtol=0), key


def test_only_the_newest_checkpoints_are_kept_and_no_staging_is_left(tmp_path: Path) -> None:
    model, optimizer, scheduler = fresh()
    for step in (1, 2, 3, 10):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler, keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000003", "step-00000010"]
    assert latest_checkpoint(tmp_path).name == "step-00000010"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000003",
        "step-00000010",
    ]
    files = {p.name for p in latest_checkpoint(tmp_path).iterdir()}
    needed = {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng.safetensors"}
    assert needed | {STATE_FILE} <= files
    manifest = read_state(latest_checkpoint(tmp_path))["files"]
    assert set(manifest) == files - {STATE_FILE}  # every other file is hashed
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_staging_folders_are_never_taken_for_checkpoints(tmp_path: Path) -> None:
    model, optimizer, scheduler = fresh()
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    (tmp_path / "checkpoints" / ".tmp-crashed").mkdir()  # what a crash mid-save leaves
    assert latest_checkpoint(tmp_path).name == "step-00000001"


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model, optimizer, scheduler = fresh()
    return save_checkpoint(tmp_path, 5, model, optimizer, scheduler)


def rewrite_state(path: Path, **changes: object) -> None:
    state = json.loads((path / STATE_FILE).read_text())
    state.update(changes)
    (path / STATE_FILE).write_text(json.dumps(state))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / STATE_FILE).unlink(), "has no trainer_state.json; it is incomplete"),
        (lambda p: (p / STATE_FILE).write_bytes(b"\xff\xfe"), "is not valid JSON"),
        (lambda p: rewrite_state(p, version=99), "unknown format version"),
        (lambda p: (p / "rng.safetensors").unlink(), "is missing rng.safetensors"),
        (lambda p: (p / "optimizer.pt").write_bytes(b"x"), "optimizer.pt is corrupt"),
        (
            lambda p: (p / "adapter_config.json").write_text("{}"),
            "adapter_config.json is corrupt",
        ),
    ],
    ids=["no-state", "bad-state", "version", "missing-file", "optimizer", "adapter-config"],
)
def test_damage_is_reported_not_loaded(saved: Path, damage, message: str) -> None:
    damage(saved)
    with pytest.raises(CheckpointError, match=message):
        read_state(saved)
    model, optimizer, scheduler = fresh()
    before = adapter_state(model)
    with pytest.raises(CheckpointError):
        load_checkpoint(saved, model, optimizer, scheduler)
    after = adapter_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_checkpoint_of_another_adapter_shape_is_a_checkpoint_error(saved: Path) -> None:
    model, optimizer, scheduler = fresh(r=2)
    with pytest.raises(CheckpointError, match="does not fit this adapter: size mismatch"):
        load_checkpoint(saved, model, optimizer, scheduler)
