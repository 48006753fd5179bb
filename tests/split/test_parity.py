"""One split step (silo head/tail + remote trunk over AEAD frames) equals one centralized step."""

from __future__ import annotations

import pytest
import torch

from silotune.config import SPFConfig
from silotune.split.parts import build_half
from silotune.train.job import build_job
from silotune.train.loop import make_optimizer, make_scheduler, train_step
from tests.split.conftest import open_silo, paired_step, silo_end, split_cfg, trunk_server

TOL = 1e-5


def _centralized(cfg):
    job = build_job(cfg.model_copy(update={"mode": "centralized"}))
    optimizer = make_optimizer(job.model, cfg.train)
    return job, optimizer, make_scheduler(optimizer, cfg.train)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _silo_grads(end) -> dict:
    parts = [end.half.parts.head, end.half.parts.tail]
    names = end.names.names
    params = [dict(p.named_parameters()) for p in parts]
    return {peft: params[i][local].grad.clone() for i, local, peft in names}


def _trainable(model) -> dict:
    """Every trainable tensor (LoRA and SPF deltas) under the names split states use."""
    adapter = f".{model.active_adapter}."
    return {
        n.replace(adapter, "."): p.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def _centralized_grads(job, names: list[str]) -> dict:
    adapter = f".{job.model.active_adapter}."
    grads = {
        n.replace(adapter, "."): p.grad for n, p in job.model.named_parameters() if p.requires_grad
    }
    return {n: grads[n].clone() for n in names}


CASES = [
    ("tiny-llama", "sequential", 1, False),
    ("tiny-llama", "client-batching", 1, False),
    ("tiny-llama", "server-hierarchical", 1, False),
    ("tiny-llama", "client-batching", 0, False),  # head of embeddings only: nothing to train there
    ("gpt2", "client-batching", 1, False),
    # SPF + LoRA: each side trains the SPF rows of its own blocks, SPF rows at their own lr.
    ("tiny-llama", "sequential", 1, True),
    ("tiny-llama", "client-batching", 1, True),
    ("tiny-llama", "server-hierarchical", 1, True),
    ("gpt2", "client-batching", 1, True),
]


@pytest.mark.parametrize("model,mode,head_layers,spf", CASES)
def test_split_steps_equal_centralized_steps(model, mode, head_layers, spf, keys_dir, gpt2_dir):
    name = str(gpt2_dir) if model == "gpt2" else model
    # grad_accum 2 and a small max_grad_norm: clipping is active, so the joint norm matters.
    train = {"grad_accum": 2, "max_grad_norm": 0.05, "max_steps": 2}
    cfg = split_cfg(name, train, server_mode=mode, head_layers=head_layers)
    if spf:
        cfg.adapter.spf = SPFConfig(enabled=True, lr=3e-3)
    job, optimizer, scheduler = _centralized(cfg)
    with trunk_server(cfg, keys_dir) as (service, connect_fn):
        end = silo_end(cfg, open_silo(connect_fn, keys_dir, "silo-0"))
        for step in range(2):
            want, got = paired_step(job, optimizer, scheduler, end, cfg, step)
            assert got.loss == pytest.approx(want.loss, abs=TOL)
            assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-5)
            assert want.grad_norm > cfg.train.max_grad_norm  # clipping really happened
            silo_grads = _silo_grads(end)  # after clipping, as the optimizer used them
            assert _max_diff(silo_grads, _centralized_grads(job, list(silo_grads))) <= TOL
        trunk = end.link.finish()  # answered after the trunk processed every earlier frame
        rows = {k: trunk.pop(k) for k in list(trunk) if k.endswith(".spf.rows")}
        updated = {**end.adapter(), **trunk}
        reference = _trainable(job.model)
        assert _max_diff(updated, reference) <= TOL
        initial = _trainable(build_half(cfg, "trunk").model)
        assert trunk.keys() <= initial.keys()
        assert _max_diff(trunk, {k: initial[k] for k in trunk}) > 1e-4  # the coordinator trained it
        assert service.engine.commits == 2
    spf_names = [k for k in reference if k.endswith(".spf.delta")]
    assert bool(spf_names) == spf
    if spf:  # every delta trained, the trunk's rows are the centralized job's selection
        assert all(reference[k].abs().max() > 0 for k in spf_names)
        central = dict(job.model.named_modules())
        assert rows and rows.keys() == {k[: -len("delta")] + "rows" for k in trunk if "spf" in k}
        for key, value in rows.items():
            assert torch.equal(value, central[key.removesuffix(".rows")].rows)
    frames = end.session.stats
    assert frames.sent_frames == 1 + 2 * (2 * 2 + 1) + 1  # join, 2 x (2 fwd + 2 bwd + commit), bye


def test_wire_compression_halves_the_bytes_and_keeps_the_loss(keys_dir):
    results = {}
    for dtype in ("float32", "float16"):
        cfg = split_cfg(train={"max_steps": 1}, activation_dtype=dtype)
        job, _, _ = _centralized(cfg)
        with trunk_server(cfg, keys_dir) as (_, connect_fn):
            end = silo_end(cfg, open_silo(connect_fn, keys_dir, "silo-0"))
            before = end.session.stats.total_bytes
            out = train_step(
                end.model,
                job.stream,
                0,
                end.optimizer,
                end.scheduler,
                cfg.train,
                job.device,
                loss_fn=end.model.loss,
            )
            results[dtype] = (out.loss, end.session.stats.total_bytes - before)
            end.link.finish()
    (loss32, bytes32), (loss16, bytes16) = results["float32"], results["float16"]
    assert 0.45 < bytes16 / bytes32 < 0.56
    assert loss16 == pytest.approx(loss32, abs=1e-2)
