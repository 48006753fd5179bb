"""The centralized reference trainer: one process, all data; the baseline for every other mode."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from silotune.adapters.peft_adapters import attach_adapter, save_adapter
from silotune.config import JobConfig, dump_config, load_config
from silotune.data.registry import DatasetSplits, load_splits
from silotune.data.tasks import ClassificationTask, LanguageModelingTask, make_task
from silotune.errors import CheckpointError, ConfigError
from silotune.eval.evaluate import evaluate
from silotune.models.loading import load_model
from silotune.progress import progress_bar, progress_hook
from silotune.train.checkpoint import (
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from silotune.train.loop import BatchStream, StepOutput, make_optimizer, make_scheduler, train_step

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
ADAPTER_DIR = "adapter"
RUN_ENTRIES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, ADAPTER_DIR, "checkpoints")
# Keys that may change between a run and its resumption (they do not change what is computed).
# train.max_steps only with a constant schedule: linear and cosine decay depend on it.
RESUMABLE_CHANGES = {
    "output_dir",
    "train.max_steps",
    "train.eval_every",
    "train.log_every",
    "train.keep_checkpoints",
}


@dataclass
class Job:
    """Everything a training process needs, built once from a config."""

    config: JobConfig
    model: PeftModel
    task: ClassificationTask | LanguageModelingTask
    splits: DatasetSplits
    stream: BatchStream
    device: torch.device


def build_job(cfg: JobConfig) -> Job:
    """Load model and data, attach a fresh adapter, encode the training split."""
    loaded = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype, seed=cfg.train.seed)
    splits = load_splits(cfg.data, seed=cfg.train.seed)
    task = make_task(
        loaded.tokenizer, cfg.data.task, splits.labels, splits.prompt_template, cfg.data.max_length
    )
    model = attach_adapter(loaded.model, cfg.adapter, seed=cfg.train.seed)
    encoded = [task.encode(ex) for ex in splits.train]
    stream = BatchStream(
        encoded, cfg.train.batch_size, cfg.train.seed, loaded.tokenizer.pad_token_id
    )
    return Job(cfg, model, task, splits, stream, loaded.device)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        out.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def check_output_dir(cfg: JobConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run or resume an incompatible one; writes nothing."""
    out = cfg.output_dir
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pick one")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file, not a folder")
    has_run = out.is_dir() and any((out / e).exists() for e in RUN_ENTRIES)
    if resume:
        if latest_checkpoint(out) is None:
            raise CheckpointError(f"--resume: {out} holds no checkpoint to resume from")
        saved = _flatten(load_config(out / CONFIG_FILE).model_dump(mode="json"))
        now = _flatten(cfg.model_dump(mode="json"))
        unused = ("federation.", "split.")  # sections a centralized run never reads
        changed = sorted(
            k
            for k in now
            if saved.get(k) != now[k] and k not in RESUMABLE_CHANGES and not k.startswith(unused)
        )
        if changed:
            raise ConfigError(
                f"--resume: the config differs from the run in {out} at {', '.join(changed)}; "
                f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change"
            )
        if (
            saved.get("train.max_steps") != now["train.max_steps"]
            and cfg.train.scheduler != "constant"
        ):
            raise ConfigError(
                f"--resume: train.max_steps cannot change with the {cfg.train.scheduler} scheduler "
                "(its learning rates depend on max_steps); start a new run instead"
            )
        return
    if has_run and not overwrite:
        state = (
            "a finished run" if (out / SUMMARY_FILE).exists() else "an unfinished run (--resume)"
        )
        raise ConfigError(f"output_dir {out} already holds {state}; pass --overwrite to replace it")


def reset_output_dir(cfg: JobConfig) -> None:
    """Remove only silotune's own files from output_dir and write the run's config.yaml."""
    out = cfg.output_dir
    for entry in RUN_ENTRIES:
        path = out / entry
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(dump_config(cfg), encoding="utf-8")


def prepare_output_dir(cfg: JobConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run; on --overwrite remove only silotune's own files in the folder."""
    check_output_dir(cfg, resume, overwrite)
    if not resume:
        reset_output_dir(cfg)


def train_record(step: int, out: StepOutput, elapsed_s: float, **extra: Any) -> dict[str, Any]:
    """The metrics.jsonl record of a training step (modes add their own fields in `extra`)."""
    return {
        "step": step,
        "split": "train",
        "loss": out.loss,
        "lr": out.lr,
        "grad_norm": out.grad_norm,
        "elapsed_s": elapsed_s,
        **extra,
    }


class MetricsLog:
    """Append-only JSONL metrics.

    On resume, records past the checkpoint's step are dropped, and so are test records (they
    belong to the end of a run; the resumed run writes its own) and a line torn by a crash.
    """

    def __init__(self, path: Path, keep_until_step: int | None = None) -> None:
        self.path = path
        if keep_until_step is not None and path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if (
                    isinstance(record, dict)
                    and record.get("step", 0) <= keep_until_step
                    and record.get("split") != "test"
                ):
                    kept.append(line)
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def train_centralized(
    cfg: JobConfig,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train `cfg` in one process; returns the summary also written to `summary.json`.

    The global torch RNG (LoRA dropout) is seeded with `train.seed` (restored from the checkpoint
    on resume) inside a fork, so the caller's RNG state is left as it was.
    """
    check_output_dir(cfg, resume, overwrite)
    job = build_job(cfg)  # bad model or data fails here, before an old run is replaced
    if not resume:
        reset_output_dir(cfg)
    cuda = [job.device.index or 0] if job.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.train.seed)
        return _train(cfg, job, resume, progress, on_eval)


def _train(
    cfg: JobConfig,
    job: Job,
    resume: bool,
    progress: bool,
    on_eval: Callable[[int, dict[str, float]], None] | None,
) -> dict[str, Any]:
    t = cfg.train
    optimizer = make_optimizer(job.model, t)
    scheduler = make_scheduler(optimizer, t)
    start = 0
    if resume:
        ckpt = latest_checkpoint(cfg.output_dir)
        assert ckpt is not None  # checked in check_output_dir
        try:
            start = load_checkpoint(ckpt, job.model, optimizer, scheduler)["step"]
        except CheckpointError as err:
            older = checkpoint_dirs(cfg.output_dir)[:-1]
            hint = f"; to resume from {older[-1].name} instead, delete {ckpt.name}" if older else ""
            raise CheckpointError(f"{err}{hint}") from None
        if start > t.max_steps:
            raise ConfigError(
                f"--resume: the checkpoint is at step {start}, past train.max_steps {t.max_steps}"
            )
        log.info("Resuming from %s (step %d)", ckpt, start)
    metrics = MetricsLog(cfg.output_dir / METRICS_FILE, keep_until_step=start if resume else None)
    clock = time.perf_counter()
    with progress_bar(progress) as bar:
        task_id = bar.add_task("train", total=t.max_steps, completed=start, note="loss -")
        for step in range(start, t.max_steps):
            out = train_step(job.model, job.stream, step, optimizer, scheduler, t, job.device)
            done = step + 1
            bar.update(task_id, advance=1, note=f"loss {out.loss:.4f}")
            if done % t.log_every == 0 or done == t.max_steps:
                metrics.write(train_record(done, out, time.perf_counter() - clock))
            if done % t.eval_every == 0 or done == t.max_steps:
                hook = progress_hook(bar, f"validation @ {done}")
                scores = evaluate(
                    job.model, job.task, job.splits.validation, t.eval_batch_size, job.device, hook
                )
                metrics.write({"step": done, "split": "validation", **scores})
                log.info("step %d validation %s", done, format_scores(scores))
                if on_eval is not None:
                    on_eval(done, scores)
                save_checkpoint(
                    cfg.output_dir, done, job.model, optimizer, scheduler, keep=t.keep_checkpoints
                )
    train_s = time.perf_counter() - clock
    save_adapter(job.model, cfg.output_dir / ADAPTER_DIR)
    with progress_bar(progress) as bar:
        hook = progress_hook(bar, "test")
        test = evaluate(job.model, job.task, job.splits.test, t.eval_batch_size, job.device, hook)
    metrics.write({"step": t.max_steps, "split": "test", **test})
    return write_summary(cfg, train_s, test)


def write_summary(
    cfg: JobConfig, train_s: float, test: dict[str, float], **extra: Any
) -> dict[str, Any]:
    """Write and return a finished run's ``summary.json`` (``extra`` keys follow ``mode``)."""
    summary = {
        "mode": cfg.mode,
        **extra,
        "steps": cfg.train.max_steps,
        "train_seconds": train_s,
        "test": test,
        "adapter": str(cfg.output_dir / ADAPTER_DIR),
    }
    (cfg.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def format_scores(scores: dict[str, float]) -> str:
    """Scores as `name=value` pairs for logs (the example count left out)."""
    return " ".join(f"{k}={v:.4f}" for k, v in scores.items() if k != "examples")
