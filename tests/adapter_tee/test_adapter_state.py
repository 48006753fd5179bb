"""The adapter app's packed training state: a resumed run continues exactly where it stopped."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from silotune.adapter_tee.state import pack_state, unpack_state
from silotune.adapters.peft_adapters import adapter_state
from silotune.config import JobConfig
from silotune.errors import CheckpointError
from silotune.train.job import Job, build_job
from silotune.train.loop import make_optimizer, make_scheduler, train_step


@dataclass
class Run:
    job: Job
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def steps(self, first: int, last: int) -> None:
        for step in range(first, last):
            job = self.job
            train_step(
                job.model,
                job.stream,
                step,
                self.optimizer,
                self.scheduler,
                job.config.train,
                job.device,
            )


def _run(make_job: Callable[..., JobConfig]) -> Run:
    job = build_job(make_job("train.scheduler=cosine", "train.warmup_steps=1"))
    optimizer = make_optimizer(job.model, job.config.train)
    return Run(job, optimizer, make_scheduler(optimizer, job.config.train))


def test_packed_state_resumes_bit_for_bit(make_job: Callable[..., JobConfig]) -> None:
    straight, stopped = _run(make_job), _run(make_job)
    straight.steps(0, 4)
    stopped.steps(0, 2)
    rng = torch.get_rng_state()
    data = pack_state(2, stopped.job.model, stopped.optimizer, stopped.scheduler, rng)

    resumed = _run(make_job)
    step, restored_rng = unpack_state(data, resumed.job.model, resumed.optimizer, resumed.scheduler)
    assert step == 2 and torch.equal(restored_rng, rng)
    resumed.steps(2, 4)
    final, expected = adapter_state(resumed.job.model), adapter_state(straight.job.model)
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()


def test_a_malformed_state_is_a_clear_error(make_job: Callable[..., JobConfig]) -> None:
    run = _run(make_job)
    with pytest.raises(CheckpointError, match="malformed"):
        unpack_state(b"\x00" * 3, run.job.model, run.optimizer, run.scheduler)
