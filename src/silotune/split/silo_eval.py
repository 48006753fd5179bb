"""A split silo's evaluations: through the split model, or on the silo's own finished copy.

Classification (label likelihood) is scored through the split model: the silo's head and tail,
the coordinator's trunk, the frames as in training.

Instruction tuning generates text, and generating through the split model would cost one round
trip, and show the coordinator one head activation, per new token. So a split silo scores it in
two places:

- periodic validation goes through the split model, with response loss and perplexity only
  (no generation, no multiple choice): the coordinator sees what a training step shows it;
- the test evaluation runs after the last step, when the silo has received the trunk's adapter
  (it does for every task, to save the whole adapter) and so holds the whole fine-tuned model:
  generation, ROUGE-L, exact match and multiple choice run on the silo alone. The coordinator sees
  none of the test prompts and none of the generated text; the silo's own copy also serves
  ``silotune generate`` afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from silotune.adapters.peft_adapters import load_adapter
from silotune.config import JobConfig
from silotune.data.instruct import InstructionTask
from silotune.data.registry import DatasetSplits
from silotune.eval.evaluate import evaluate
from silotune.models.loading import load_model


def scored_locally(task: Any) -> bool:
    """True when the silo's test evaluation runs on its own copy (after the trunk's adapter)."""
    return isinstance(task, InstructionTask)


def validation_scores(
    cfg: JobConfig, model: nn.Module, task: Any, splits: DatasetSplits, device: torch.device
) -> dict[str, float]:
    """Periodic validation through the split model (instruction: loss and perplexity only)."""
    return evaluate(
        model,
        task,
        splits.validation,
        cfg.train.eval_batch_size,
        device,
        eval_cfg=cfg.eval,
        generate_for=0,
    )


def split_test_scores(
    cfg: JobConfig, model: nn.Module, task: Any, splits: DatasetSplits, device: torch.device
) -> dict[str, float]:
    """The test evaluation through the split model (before the session ends)."""
    return evaluate(model, task, splits.test, cfg.train.eval_batch_size, device)


def local_test_scores(
    cfg: JobConfig, task: InstructionTask, splits: DatasetSplits, adapter_dir: Path
) -> dict[str, float]:
    """The test evaluation on the silo's own base model + the whole adapter it saved."""
    loaded = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype, seed=cfg.train.seed)
    model = load_adapter(loaded.model, adapter_dir).to(loaded.device)
    mc = splits.multiple_choice if cfg.eval.multiple_choice else None
    return evaluate(
        model,
        task,
        splits.test,
        cfg.train.eval_batch_size,
        loaded.device,
        eval_cfg=cfg.eval,
        multiple_choice=mc,
    )
