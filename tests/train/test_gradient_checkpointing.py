"""train.gradient_checkpointing: the same loss and gradients, far fewer activations kept."""

from __future__ import annotations

import pytest
import torch

from silotune.errors import ConfigError
from silotune.train.job import build_job
from silotune.train.loop import forward_loss


def _step(cfg) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, adapter gradients and bytes saved for backward of one batch."""
    job = build_job(cfg)
    job.model.train()
    batch = job.stream.micro_batch(0)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward_loss(job.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in job.model.named_parameters() if p.requires_grad}
    return float(loss), grads, saved


@pytest.mark.parametrize(
    "adapter", [["adapter.r=4"], ["adapter.spf.enabled=true"]], ids=["lora", "spf"]
)
def test_same_gradients_with_fewer_saved_activations(make_job, adapter) -> None:
    common = ["data.max_length=64", "train.batch_size=8", *adapter]
    loss, grads, saved = _step(make_job(*common))
    loss_ck, grads_ck, saved_ck = _step(make_job(*common, "train.gradient_checkpointing=true"))
    assert loss_ck == pytest.approx(loss, abs=1e-6)
    assert grads.keys() == grads_ck.keys()
    assert max(float((grads[k] - grads_ck[k]).abs().max()) for k in grads) <= 1e-6
    assert max(float(g.abs().max()) for g in grads.values()) > 0  # a real gradient
    assert saved_ck < 0.5 * saved, (saved_ck, saved)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["adapter.placement=enclave"], "adapter.placement enclave"),
        (["adapter.type=prefix"], "prefix adapters"),
        (["mode=split", "adapter.type=prefix"], "prefix adapters"),
    ],
)
def test_combinations_that_cannot_checkpoint_are_refused(make_job, overrides, match) -> None:
    with pytest.raises(ConfigError, match=match):
        make_job(*overrides, "train.gradient_checkpointing=true")
