"""Server-side update rules: FedAvg/FedProx (SGD on the averaged update) and FedAdam.

The coordinator holds the global adapter as a PEFT model and treats the negated weighted-mean
update as a pseudo-gradient: ``torch.optim.SGD`` with ``lr = server_lr`` (1.0 = plain FedAvg) for
fedavg and fedprox (FedProx changes only the silos' local loss), ``torch.optim.Adam`` for fedadam
(Reddi et al. 2021, "Adaptive Federated Optimization"; betas 0.9/0.99 as in Flower's FedAdam,
``eps`` = tau = 1e-9; torch's Adam adds bias correction, which Flower's FedAdam omits). Using
torch optimizers lets the round checkpoint reuse ``train.checkpoint`` unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from peft import PeftModel

from silotune.config.federation import FederationConfig
from silotune.federated.vectors import trainable


def make_server_optimizer(model: PeftModel, fed: FederationConfig) -> torch.optim.Optimizer:
    """The server optimizer over the global adapter's parameters."""
    params = trainable(model)
    lr = fed.effective_server_lr
    if fed.strategy == "fedadam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99), eps=1e-9)
    return torch.optim.SGD(params, lr=lr)


def apply_update(
    model: PeftModel, optimizer: torch.optim.Optimizer, mean_update: NDArray[np.float32]
) -> None:
    """One server step with pseudo-gradient ``-mean_update`` (dense, flat, float32)."""
    source = torch.from_numpy(np.ascontiguousarray(mean_update, dtype=np.float32))
    offset = 0
    for p in trainable(model):
        n = p.numel()
        p.grad = -source[offset : offset + n].view_as(p).to(p.device, p.dtype)
        offset += n
    if offset != source.numel():
        raise ValueError(f"update has {source.numel()} values, the adapter {offset}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
