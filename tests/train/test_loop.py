"""Tests for silotune.train.loop: stateless batches, masked loss, grad accumulation, NaN guard."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from silotune.adapters.peft_adapters import attach_adapter
from silotune.config import AdapterConfig, TrainConfig
from silotune.data.tasks import IGNORE_INDEX, Encoded
from silotune.errors import TrainingError
from silotune.models.presets import build_tiny_llama
from silotune.train.loop import (
    BatchStream,
    causal_lm_loss,
    forward_loss,
    make_optimizer,
    make_scheduler,
    train_step,
)


def examples(n: int, length: int = 5) -> list[Encoded]:
    """n distinct sequences; example i is made of token 10 + i (so a batch shows its indices)."""
    return [Encoded([10 + i] * length, [10 + i] * length) for i in range(n)]


def test_batch_stream_is_a_pure_function_of_the_index() -> None:
    fresh = BatchStream(examples(7), batch_size=3, seed=5, pad_id=0)
    warm = BatchStream(examples(7), batch_size=3, seed=5, pad_id=0)
    seen = [warm.indices(i) for i in range(12)]  # walk through several epochs first
    for i in (11, 0, 6, 3, 11):  # any order, jumping back and forth across epochs
        assert fresh.indices(i) == seen[i]
    batch = fresh.micro_batch(4)
    assert batch["input_ids"][:, 0].tolist() == [10 + j for j in seen[4]]


def test_each_epoch_is_a_fresh_permutation_of_every_example() -> None:
    n, size = 6, 2
    stream = BatchStream(examples(n), batch_size=size, seed=0, pad_id=0)
    flat = [j for i in range(3 * n // size) for j in stream.indices(i)]
    epochs = [flat[k * n : (k + 1) * n] for k in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch
    other = BatchStream(examples(n), batch_size=size, seed=1, pad_id=0)
    assert [other.indices(i) for i in range(3)] != [stream.indices(i) for i in range(3)]


def test_batch_stream_rejects_an_empty_training_set() -> None:
    with pytest.raises(ValueError, match="empty"):
        BatchStream([], batch_size=2, seed=0, pad_id=0)


def test_causal_lm_loss_skips_ignored_targets() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 7, -100, 1, 2]])
    # position t predicts labels[t + 1]; only targets != -100 count, averaged over all of them
    terms = [
        -torch.log_softmax(logits[b, t], dim=-1)[labels[b, t + 1]]
        for b in range(2)
        for t in range(4)
        if labels[b, t + 1] != IGNORE_INDEX
    ]
    want = torch.stack(terms).mean()
    assert causal_lm_loss(logits, labels).item() == pytest.approx(want.item(), abs=1e-6)
    # logits whose next label is ignored do not matter
    changed = logits.clone()
    changed[0, 0] += 100.0
    changed[0, 3] -= 50.0  # predicts labels[0, 4] = -100
    changed[:, 4] = 0.0  # the last position predicts nothing
    assert causal_lm_loss(changed, labels).item() == pytest.approx(want.item(), abs=1e-6)


@pytest.fixture
def lora_tiny_llama() -> nn.Module:
    model, _ = build_tiny_llama(0)
    peft_model = attach_adapter(model, AdapterConfig(r=4), seed=0)
    with torch.no_grad():  # lora_B starts at 0; make both factors matter for the gradient
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return peft_model


def token_examples(n: int) -> list[Encoded]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        ids = torch.randint(2, 4000, (6 + i % 3,), generator=gen).tolist()
        out.append(Encoded(ids, [IGNORE_INDEX] * 3 + ids[3:]))
    return out


def test_grad_accumulation_is_the_mean_of_micro_batch_means(lora_tiny_llama: nn.Module) -> None:
    model = lora_tiny_llama
    stream = BatchStream(token_examples(16), batch_size=4, seed=0, pad_id=1)
    cfg = TrainConfig(batch_size=4, grad_accum=2, max_grad_norm=None, lr=1e-3)
    params = [p for p in model.parameters() if p.requires_grad]

    # step 1 reads micro-batches 2 and 3; compute each one's gradient by hand
    model.train()
    grads, losses = [], []
    for micro in (2, 3):
        model.zero_grad(set_to_none=True)
        loss = forward_loss(model, stream.micro_batch(micro))
        loss.backward()
        grads.append([p.grad.clone() for p in params])
        losses.append(loss.item())

    optimizer = make_optimizer(model, cfg)
    out = train_step(model, stream, 1, optimizer, None, cfg, torch.device("cpu"))
    assert out.loss == pytest.approx(sum(losses) / 2, rel=1e-5)
    for p, g0, g1 in zip(params, *grads, strict=True):
        torch.testing.assert_close(p.grad, (g0 + g1) / 2, atol=1e-7, rtol=1e-5)
    want_norm = torch.linalg.vector_norm(
        torch.stack(
            [torch.linalg.vector_norm((g0 + g1) / 2) for g0, g1 in zip(*grads, strict=True)]
        )
    )
    assert out.grad_norm == pytest.approx(want_norm.item(), rel=1e-4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_raises_before_the_optimizer_step(
    lora_tiny_llama: nn.Module, bad: float
) -> None:
    model = lora_tiny_llama
    stream = BatchStream(token_examples(8), batch_size=4, seed=0, pad_id=1)
    cfg = TrainConfig(batch_size=4, grad_accum=2, lr=1e-2)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def poisoned(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return forward_loss(m, batch) * bad

    with pytest.raises(TrainingError, match="step 4; lower train.lr"):
        train_step(model, stream, 3, optimizer, scheduler, cfg, torch.device("cpu"), poisoned)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert optimizer.state_dict()["state"] == {}  # AdamW never stepped
    assert scheduler.last_epoch == 0


def test_optimizer_takes_trainable_parameters_only(lora_tiny_llama: nn.Module) -> None:
    optimizer = make_optimizer(lora_tiny_llama, TrainConfig(lr=0.1, weight_decay=0.01))
    params = optimizer.param_groups[0]["params"]
    assert params and all(p.requires_grad for p in params)
    names = {id(p): n for n, p in lora_tiny_llama.named_parameters()}
    assert all("lora_" in names[id(p)] for p in params)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(frozen, TrainConfig())


@pytest.mark.parametrize(
    ("scheduler", "warmup", "want"),
    [
        ("constant", 0, [1.0, 1.0, 1.0, 1.0, 1.0]),
        ("constant", 2, [1 / 3, 2 / 3, 1.0, 1.0, 1.0]),
        ("linear", 0, [1.0, 0.75, 0.5, 0.25, 0.0]),
        ("linear", 2, [1 / 3, 2 / 3, 1.0, 0.5, 0.0]),
        (
            "cosine",
            0,
            [1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4), 0.0],
        ),
    ],
)
def test_scheduler_factors(scheduler: str, warmup: int, want: list[float]) -> None:
    cfg = TrainConfig(lr=2.0, max_steps=4, scheduler=scheduler, warmup_steps=warmup)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_scheduler(optimizer, cfg)
    got = []
    for _ in range(5):
        got.append(optimizer.param_groups[0]["lr"] / cfg.lr)
        optimizer.step()
        sched.step()
    assert got == pytest.approx(want, abs=1e-9)
