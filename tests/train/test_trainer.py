"""Tests for silotune.train.trainer: exact resume, run-folder safety, clear errors, learning."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from silotune.adapters.peft_adapters import attach_adapter
from silotune.config import JobConfig, config_from_dict
from silotune.errors import CheckpointError, ConfigError, DataError
from silotune.models.presets import build_tiny_llama
from silotune.train.checkpoint import checkpoint_dirs, latest_checkpoint
from silotune.train.run_folder import METRICS_FILE
from silotune.train.trainer import train_centralized
from tests.conftest import FAST_JOB

MakeJob = Callable[..., JobConfig]


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def metrics(run: Path) -> list[dict]:
    lines = (run / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]  # one JSON object per line, or this fails


def steps_and_splits(records: list[dict]) -> list[tuple[int, str]]:
    return [(r["step"], r["split"]) for r in records]


def digests(run: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


class Interrupt(Exception):
    """Stands in for a crash or Ctrl-C in the middle of a run."""


def interrupt_at(step: int) -> Callable[[int, dict[str, float]], None]:
    def hook(done: int, scores: dict[str, float]) -> None:
        if done == step:
            raise Interrupt

    return hook


RESUME_BASE = (
    "adapter.dropout=0.3",  # dropout > 0, so the restored RNG decides the masks
    "train.max_steps=20",
    "train.eval_every=5",
    "train.log_every=5",
    "train.batch_size=2",
)


@pytest.mark.parametrize(
    ("extra", "extend"),
    [
        (("train.grad_accum=1",), True),
        # a decaying schedule with warm-up: the scheduler state must come back too (max_steps
        # cannot change under it, so only the interrupted variant applies)
        (("train.grad_accum=2", "train.scheduler=cosine", "train.warmup_steps=3"), False),
    ],
    ids=["accum1-constant", "accum2-cosine"],
)
def test_stopped_and_resumed_run_ends_with_the_same_adapter(
    make_job: MakeJob, tmp_path: Path, extra: tuple[str, ...], extend: bool
) -> None:
    full = make_job(*RESUME_BASE, *extra, output_dir=tmp_path / "full")
    train_centralized(full, progress=False)
    resumed = ["cut"]

    if extend:  # (a) run 10 of 20 steps, then resume with max_steps raised to 20
        part = make_job(*RESUME_BASE, *extra, "train.max_steps=10", output_dir=tmp_path / "part")
        train_centralized(part, progress=False)
        assert (tmp_path / "part" / "summary.json").is_file()
        again = make_job(*RESUME_BASE, *extra, output_dir=tmp_path / "part")
        train_centralized(again, resume=True, progress=False)
        resumed.append("part")
    # (b) interrupt during step 15's evaluation (before its checkpoint): resume from step 10,
    # and the metrics of steps 11-15 written before the interruption must not be duplicated
    cut = make_job(*RESUME_BASE, *extra, output_dir=tmp_path / "cut")
    with pytest.raises(Interrupt):
        train_centralized(cut, progress=False, on_eval=interrupt_at(15))
    assert latest_checkpoint(tmp_path / "cut").name == "step-00000010"
    assert (15, "validation") in steps_and_splits(metrics(tmp_path / "cut"))
    train_centralized(cut, resume=True, progress=False)

    want = metrics(tmp_path / "full")
    assert [r["step"] for r in want if r["split"] == "train"] == [5, 10, 15, 20]
    for name in resumed:
        assert max_diff(adapter_tensors(tmp_path / name), adapter_tensors(tmp_path / "full")) == 0.0
        got = metrics(tmp_path / name)
        assert steps_and_splits(got) == steps_and_splits(want)  # no duplicated steps
        for g, w in zip(got, want, strict=True):
            for key in ("loss", "lr", "accuracy", "macro_f1"):
                if key in w:
                    assert g[key] == pytest.approx(w[key], abs=1e-6)


def test_same_seed_same_adapter_different_seed_different(make_job: MakeJob, tmp_path: Path) -> None:
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        torch.rand(7)  # the caller's RNG state must not matter
        cfg = make_job("adapter.dropout=0.3", f"train.seed={seed}", output_dir=tmp_path / name)
        train_centralized(cfg, progress=False)
        runs[name] = adapter_tensors(tmp_path / name)
    assert max_diff(runs["a"], runs["b"]) == 0.0
    assert max_diff(runs["a"], runs["c"]) > 1e-4


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, JobConfig]:
    """A finished 4-step run with checkpoints at steps 2 and 4 (shared, copy before changing)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    cfg = config_from_dict({**FAST_JOB, "output_dir": str(run)})
    train_centralized(cfg, progress=False)
    return run, cfg


def copy_run(finished: tuple[Path, JobConfig], dest: Path) -> JobConfig:
    run, cfg = finished
    shutil.copytree(run, dest)
    return cfg.model_copy(update={"output_dir": dest})


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda ckpt: flip_bytes(ckpt / "adapter_model.safetensors"), "adapter_model.safetensors"),
        (lambda ckpt: flip_bytes(ckpt / "optimizer.pt"), "optimizer.pt"),
        (lambda ckpt: flip_bytes(ckpt / "rng.safetensors"), "rng.safetensors"),
        (lambda ckpt: (ckpt / "trainer_state.json").unlink(), "trainer_state.json"),
        (lambda ckpt: (ckpt / "trainer_state.json").write_text("{"), "trainer_state.json"),
        (lambda ckpt: (ckpt / "optimizer.pt").unlink(), "optimizer.pt"),
    ],
    ids=["adapter-bytes", "optimizer-bytes", "rng-bytes", "no-state", "bad-state", "no-optimizer"],
)
def test_corrupt_checkpoint_is_one_clear_error_and_damages_nothing(
    finished_run: tuple[Path, JobConfig],
    tmp_path: Path,
    damage: Callable[[Path], None],
    expected: str,
) -> None:
    cfg = copy_run(finished_run, tmp_path / "run")
    damage(latest_checkpoint(cfg.output_dir))
    before = digests(cfg.output_dir)
    with pytest.raises(CheckpointError) as info:
        train_centralized(cfg, resume=True, progress=False)
    message = str(info.value)
    assert expected in message and "step-00000004" in message and "\n" not in message
    assert message.endswith("to resume from step-00000002 instead, delete step-00000004")
    assert digests(cfg.output_dir) == before


def test_finished_run_is_not_overwritten_without_overwrite(
    finished_run: tuple[Path, JobConfig], tmp_path: Path
) -> None:
    cfg = copy_run(finished_run, tmp_path / "run")
    (cfg.output_dir / "notes.txt").write_text("mine")
    before = digests(cfg.output_dir)
    with pytest.raises(ConfigError, match="already holds a finished run; pass --overwrite"):
        train_centralized(cfg, progress=False)
    assert digests(cfg.output_dir) == before

    # a failing start (bad data) with --overwrite must not wipe the old run either
    broken = cfg.model_copy(update={"data": cfg.data.model_copy(update={"dataset": "nope/"})})
    with pytest.raises(DataError):
        train_centralized(broken, overwrite=True, progress=False)
    assert digests(cfg.output_dir) == before

    train_centralized(cfg, overwrite=True, progress=False)
    assert (cfg.output_dir / "notes.txt").read_text() == "mine"  # not silotune's: kept
    records = metrics(cfg.output_dir)
    assert len(steps_and_splits(records)) == len(set(steps_and_splits(records)))
    assert [c.name for c in checkpoint_dirs(cfg.output_dir)] == ["step-00000002", "step-00000004"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("train.lr=1e-4", "train.lr"),
        ("adapter.r=2", "adapter.r"),
        ("data.max_length=48", "data.max_length"),
    ],
)
def test_resume_with_a_changed_key_is_refused_naming_it(
    finished_run: tuple[Path, JobConfig], tmp_path: Path, change: str, expected: str
) -> None:
    cfg = copy_run(finished_run, tmp_path / "run")
    changed = config_from_dict(cfg.model_dump(mode="json"), [change])
    with pytest.raises(ConfigError, match=f"differs from the run .* at {expected}"):
        train_centralized(changed, resume=True, progress=False)


def test_resume_ignores_sections_a_centralized_run_does_not_read(
    finished_run: tuple[Path, JobConfig], tmp_path: Path
) -> None:
    cfg = copy_run(finished_run, tmp_path / "run")
    data = cfg.model_dump(mode="json")
    tweaked = config_from_dict(data, ["federation.rounds=9", "split.silos=3"])
    summary = train_centralized(tweaked, resume=True, progress=False)
    assert summary["steps"] == 4


def test_resume_refusals(finished_run: tuple[Path, JobConfig], tmp_path: Path) -> None:
    cfg = copy_run(finished_run, tmp_path / "run")
    with pytest.raises(ConfigError, match="contradict"):
        train_centralized(cfg, resume=True, overwrite=True, progress=False)
    data = cfg.model_dump(mode="json")
    with pytest.raises(ConfigError, match="past train.max_steps 3"):
        train_centralized(config_from_dict(data, ["train.max_steps=3"]), resume=True)
    empty = config_from_dict(data, [f"output_dir={tmp_path / 'empty'}"])
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train_centralized(empty, resume=True, progress=False)


def test_max_steps_cannot_change_under_a_decaying_schedule(
    make_job: MakeJob, tmp_path: Path
) -> None:
    cfg = make_job("train.scheduler=linear", "train.max_steps=2")
    train_centralized(cfg, progress=False)
    longer = make_job("train.scheduler=linear", "train.max_steps=4")
    with pytest.raises(ConfigError, match="max_steps cannot change with the linear scheduler"):
        train_centralized(longer, resume=True, progress=False)


def test_missing_data_folder_or_file_is_a_data_error(make_job: MakeJob, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="neither a bundled dataset"):
        train_centralized(make_job(f"data.dataset={tmp_path / 'absent'}"), progress=False)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text(
        '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n'
    )
    (folder / "validation.jsonl").write_text('{"text": "a", "label": "x"}\n')
    with pytest.raises(DataError, match="test split"):
        train_centralized(make_job(f"data.dataset={folder}"), progress=False)
    assert not (tmp_path / "run").exists()  # nothing started


def first_and_last_train_loss(run: Path) -> tuple[float, float]:
    losses = [r["loss"] for r in metrics(run) if r["split"] == "train"]
    return losses[0], losses[-1]


def test_loss_falls_on_fortunes_sample_and_scores_are_in_range(
    make_job: MakeJob, tmp_path: Path
) -> None:
    cfg = make_job(
        "train.max_steps=40",
        "train.batch_size=8",
        "train.lr=2e-2",
        "train.log_every=1",
        "train.eval_every=20",
        "data.max_eval_examples=20",
    )
    summary = train_centralized(cfg, progress=False)
    losses = [r["loss"] for r in metrics(cfg.output_dir) if r["split"] == "train"]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # Random tiny-llama starts near ln(4096) = 8.3 on the label tokens. Its frozen random LM head
    # caps how far LoRA on q, v can go (measured: ~8.2 -> ~7.2 over 40 steps), hence 0.5.
    assert first > 7.5 and last < first - 0.5
    for split in ("validation", "test"):
        scores = [r for r in metrics(cfg.output_dir) if r["split"] == split][-1]
        assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["macro_f1"] <= 1.0
    assert summary["test"]["examples"] == 20.0
    assert summary["steps"] == 40 and Path(summary["adapter"]).is_dir()


def initial_adapter(cfg: JobConfig) -> dict[str, torch.Tensor]:
    """The adapter tensors a run of `cfg` starts from (PEFT names, as saved)."""
    model, _ = build_tiny_llama(cfg.train.seed)
    peft_model = attach_adapter(model, cfg.adapter, seed=cfg.train.seed)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def test_lm_task_runs_end_to_end(make_job: MakeJob) -> None:
    cfg = make_job(
        "data.task=lm", "train.max_steps=4", "train.eval_every=4", "data.max_eval_examples=4"
    )
    summary = train_centralized(cfg, progress=False)
    test = summary["test"]
    assert set(test) == {"loss", "perplexity", "rouge_l"}
    assert 0.0 < test["loss"] < 10.0  # ln(4096) = 8.3 for a uniform guess
    assert test["perplexity"] == pytest.approx(math.exp(test["loss"]), rel=1e-6)
    assert 0.0 <= test["rouge_l"] <= 1.0
    validation = [r for r in metrics(cfg.output_dir) if r["split"] == "validation"]
    assert [r["step"] for r in validation] == [4] and "rouge_l" in validation[0]
    assert max_diff(adapter_tensors(cfg.output_dir), initial_adapter(cfg)) > 1e-4


def test_prefix_tuning_trains_end_to_end(make_job: MakeJob) -> None:
    cfg = make_job("adapter.type=prefix", "adapter.num_virtual_tokens=4", "train.max_steps=4")
    summary = train_centralized(cfg, progress=False)
    tensors = adapter_tensors(cfg.output_dir)
    assert list(tensors) == ["prompt_embeddings"]
    # 4 virtual tokens x (6 layers x 2 (key, value) x 2 kv heads x 32 dims)
    assert tensors["prompt_embeddings"].shape == (4, 6 * 2 * 2 * 32)
    assert max_diff(tensors, initial_adapter(cfg)) > 1e-4  # the prefix was trained
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0
    assert all(math.isfinite(r["loss"]) for r in metrics(cfg.output_dir) if r["split"] == "train")
