"""The local-step loop every mode reuses: deterministic batches, loss, one optimizer step.

Centralized training, each federated silo and split training all call `train_step`; they differ only
in the `loss_fn` that turns a batch into a loss (split training's runs through the remote trunk).
Batches are a pure function of (seed, micro-batch index), so a resumed run or a silo restarted at
step k sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from silotune.adapters.spf import spf_deltas
from silotune.config import TrainConfig
from silotune.data.tasks import IGNORE_INDEX, Encoded, collate
from silotune.errors import TrainingError

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over target positions. logits (B, T, V), labels (B, T)."""
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V): position t predicts token t+1
    shift_labels = labels[:, 1:]  # (B, T-1)
    return nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def forward_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Loss of a whole (possibly PEFT-wrapped) causal LM on one batch."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return causal_lm_loss(out.logits, batch["labels"])


class BatchStream:
    """An endless, deterministic stream of micro-batches over a fixed list of examples.

    Micro-batch `i` takes positions `[i*B, (i+1)*B)` of the concatenation of per-epoch
    permutations, each drawn from a generator seeded by (seed, epoch).
    """

    def __init__(self, examples: list[Encoded], batch_size: int, seed: int, pad_id: int) -> None:
        if not examples:
            raise ValueError("cannot batch an empty training set")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.examples), generator=gen).tolist()}
        return self._perms[epoch]

    def indices(self, micro_index: int) -> list[int]:
        n, out = len(self.examples), []
        for pos in range(micro_index * self.batch_size, (micro_index + 1) * self.batch_size):
            out.append(self._perm(pos // n)[pos % n])
        return out

    def micro_batch(self, micro_index: int, device: torch.device | None = None) -> Batch:
        batch = collate([self.examples[i] for i in self.indices(micro_index)], self.pad_id)
        return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only (the base model is frozen).

    SPF deltas with their own learning rate (``adapter.spf.lr``) form a second parameter group;
    the schedule scales both groups alike.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; is an adapter attached?")
    own = {id(d.delta): d.lr for d in spf_deltas(model).values() if d.lr is not None}
    groups = [{"params": [p for p in params if id(p) not in own], "lr": cfg.lr}]
    for lr in sorted(set(own.values())):
        groups.append({"params": [p for p in params if own.get(id(p)) == lr], "lr": lr})
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant, linear decay to 0, or cosine decay to 0 at max_steps."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if cfg.scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class StepOutput:
    """What one optimizer step reports."""

    loss: float  # mean of the micro-batch losses
    grad_norm: float  # before clipping
    lr: float


def train_step(
    model: nn.Module,
    stream: BatchStream,
    step: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    cfg: TrainConfig,
    device: torch.device,
    loss_fn: LossFn = forward_loss,
) -> StepOutput:
    """Run optimizer step `step` (0-based): grad_accum micro-batches, clip, AdamW, schedule."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for micro in range(cfg.grad_accum):
        batch = stream.micro_batch(step * cfg.grad_accum + micro, device)
        loss = loss_fn(model, batch) / cfg.grad_accum  # mean of micro-batch means
        loss.backward()
        total += float(loss.detach())
    params = [p for g in optimizer.param_groups for p in g["params"]]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    lr = optimizer.param_groups[0]["lr"]
    if not math.isfinite(total) or not math.isfinite(norm):
        # Checked before the update, so the adapter and the last checkpoint stay intact.
        raise TrainingError(f"loss became {total} at step {step + 1}; lower train.lr")
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return StepOutput(loss=total, grad_norm=norm, lr=lr)
