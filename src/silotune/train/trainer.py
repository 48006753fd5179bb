"""The centralized reference trainer: one process, all data; the baseline for every other mode."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from silotune.adapters.peft_adapters import save_adapter
from silotune.config import JobConfig
from silotune.errors import CheckpointError, ConfigError
from silotune.eval.evaluate import evaluate
from silotune.progress import progress_bar, progress_hook
from silotune.train.checkpoint import (
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from silotune.train.job import Job, build_job
from silotune.train.loop import make_optimizer, make_scheduler, train_step
from silotune.train.run_folder import (
    ADAPTER_DIR,
    METRICS_FILE,
    MetricsLog,
    check_output_dir,
    format_scores,
    reset_output_dir,
    train_record,
    write_summary,
)
from silotune.train.schedule import Schedule
from silotune.train.threads import apply_threads, threads_per_process

log = logging.getLogger(__name__)


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
    apply_threads(threads_per_process(cfg))
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
    schedule = Schedule.steps(cfg)
    clock = time.perf_counter()
    with progress_bar(progress) as bar:
        task_id = bar.add_task("train", total=t.max_steps, completed=start, note="loss -")
        for step in range(start, t.max_steps):
            out = train_step(job.model, job.stream, step, optimizer, scheduler, t, job.device)
            done = step + 1
            bar.update(task_id, advance=1, note=f"loss {out.loss:.4f}")
            if schedule.logs(done):
                metrics.write(train_record(done, out, time.perf_counter() - clock))
            if schedule.evaluates(done):
                hook = progress_hook(bar, f"validation @ {done}")
                scores = evaluate(
                    job.model,
                    job.task,
                    job.splits.validation,
                    t.eval_batch_size,
                    job.device,
                    hook,
                    eval_cfg=cfg.eval,
                    generate_for=cfg.eval.generation_examples,  # periodic: capped, stays cheap
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
        mc = job.splits.multiple_choice if cfg.eval.multiple_choice else None
        test = evaluate(
            job.model,
            job.task,
            job.splits.test,
            t.eval_batch_size,
            job.device,
            hook,
            eval_cfg=cfg.eval,
            multiple_choice=mc,
        )
    metrics.write({"step": t.max_steps, "split": "test", **test})
    return write_summary(cfg, train_s, test)
