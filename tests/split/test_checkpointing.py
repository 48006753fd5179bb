"""Split training with train.gradient_checkpointing equals centralized training without it."""

from __future__ import annotations

import pytest

from silotune.train.job import build_job
from silotune.train.loop import make_optimizer, make_scheduler
from tests.split.conftest import open_silo, paired_step, silo_end, split_cfg, trunk_server


def test_checkpointed_split_step_equals_plain_centralized_step(keys_dir):
    cfg = split_cfg("tiny-llama", {"gradient_checkpointing": True}, head_layers=2, tail_layers=2)
    plain = cfg.model_copy(update={"mode": "centralized"}, deep=True)
    plain.train.gradient_checkpointing = False
    job = build_job(plain)
    optimizer = make_optimizer(job.model, plain.train)
    scheduler = make_scheduler(optimizer, plain.train)
    with trunk_server(cfg, keys_dir) as (_, connect_fn):
        end = silo_end(cfg, open_silo(connect_fn, keys_dir, "silo-0"))
        head_block = next(iter(end.half.parts.head.blocks.values()))
        assert head_block.gradient_checkpointing  # the silo's blocks really recompute
        for step in range(2):
            want, got = paired_step(job, optimizer, scheduler, end, cfg, step)
            assert got.loss == pytest.approx(want.loss, abs=1e-5)
            assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-5)
        end.link.finish()
