"""Evaluate a job's base model, optionally with a saved adapter, on one split (`silotune eval`)."""

from __future__ import annotations

from pathlib import Path

from silotune.adapters.peft_adapters import load_adapter
from silotune.config import JobConfig
from silotune.data.registry import load_splits, task_for
from silotune.errors import ConfigError
from silotune.eval.evaluate import evaluate
from silotune.models.loading import load_model
from silotune.progress import progress_bar, progress_hook


def evaluate_job(
    cfg: JobConfig, adapter_dir: Path | None, split: str = "test", progress: bool = True
) -> dict[str, float]:
    """Scores of the base model (+ adapter) on `split` with the job's task and data."""
    if split not in ("validation", "test"):
        raise ConfigError(f"--split must be validation or test, got '{split}'")
    loaded = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype, seed=cfg.train.seed)
    splits = load_splits(cfg.data, seed=cfg.train.seed)
    task = task_for(loaded.tokenizer, cfg.data, splits)
    model = loaded.model
    if adapter_dir is not None:
        model = load_adapter(model, adapter_dir).to(loaded.device)
    examples = splits.validation if split == "validation" else splits.test
    with progress_bar(progress) as bar:
        hook = progress_hook(bar, f"evaluate {split}")
        mc = splits.multiple_choice if split == "test" and cfg.eval.multiple_choice else None
        return evaluate(
            model,
            task,
            examples,
            cfg.train.eval_batch_size,
            loaded.device,
            hook,
            eval_cfg=cfg.eval,
            multiple_choice=mc,
        )
