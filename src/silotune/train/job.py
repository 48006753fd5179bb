"""A training job built from its config: model with a fresh adapter, task, data, batch stream."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel

from silotune.adapters.peft_adapters import attach_adapter
from silotune.config import JobConfig
from silotune.data.instruct import InstructionTask
from silotune.data.registry import DatasetSplits, load_splits, task_for
from silotune.data.tasks import ClassificationTask, LanguageModelingTask
from silotune.models.loading import load_model, set_gradient_checkpointing
from silotune.train.loop import BatchStream


@dataclass
class Job:
    """Everything a training process needs, built once from a config."""

    config: JobConfig
    model: PeftModel
    task: ClassificationTask | LanguageModelingTask | InstructionTask
    splits: DatasetSplits
    stream: BatchStream
    device: torch.device


def build_job(cfg: JobConfig) -> Job:
    """Load model and data, attach a fresh adapter, encode the training split."""
    loaded = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype, seed=cfg.train.seed)
    splits = load_splits(cfg.data, seed=cfg.train.seed)
    task = task_for(loaded.tokenizer, cfg.data, splits)
    set_gradient_checkpointing(loaded.model, cfg.train.gradient_checkpointing)
    model = attach_adapter(loaded.model, cfg.adapter, seed=cfg.train.seed)
    if isinstance(task, InstructionTask):
        encoded = task.encode_all(splits.train, "train")  # logs once what truncation cut
    else:
        encoded = [task.encode(ex) for ex in splits.train]
    stream = BatchStream(
        encoded, cfg.train.batch_size, cfg.train.seed, loaded.tokenizer.pad_token_id
    )
    return Job(cfg, model, task, splits, stream, loaded.device)
