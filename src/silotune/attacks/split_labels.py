"""Split mode: the coordinator infers each example's class label from the gradients the tail sends back.

Attacker
    The coordinator (it runs the trunk's backward pass).
Observes
    Every backward frame the trunk engine is handed: ``grad (B, T, C)``, the gradient of the
    silo's loss with respect to the trunk's outputs (after the silo's noise and the wire dtype),
    plus its own trunk outputs ``(B, T, C)`` and the ``mask (B, T)`` of the matching forward
    frame; recorded by :func:`~silotune.attacks.observe.observe_split`.
Knows in advance
    The public base model (the tail's architecture and untrained weights), the task's label names
    and their tokens (public config), and that the loss covers the label tokens only.
Attack
    For each row and each candidate label, the gradient the public tail would send if that label
    were the target (the label's tokens predicted at the end of the row's real tokens, computed
    on the coordinator's own trunk outputs); the guess is the candidate whose gradient has the
    largest cosine similarity with the received one.
Metric
    ``leakage`` = fraction of rows whose label is guessed right.
Chance
    The frequency of the most common label among the observed rows (always guessing it).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from silotune.attacks.observe import SplitObservation
from silotune.attacks.public import PublicModel

__all__ = ["infer_labels"]


def _row_labels(labels: torch.Tensor, label_ids: list[list[int]]) -> list[int]:
    """Index of each row's true label (scoring only), from its label tokens."""
    out = []
    for row in labels:
        tokens = row[row != -100].tolist()
        out.append(label_ids.index(tokens) if tokens in label_ids else -1)
    return out


def _candidate_grads(
    pub: PublicModel, trunk_out: torch.Tensor, mask: torch.Tensor, tokens: list[int]
) -> torch.Tensor:
    """Gradient ``(B, T, C)`` of the public tail's loss on label ``tokens`` at each row's end."""
    x = trunk_out.to(pub.device).clone().requires_grad_(True)
    logits = pub.tail(x, mask.to(pub.device)).float()  # (B, T, V)
    lengths = mask.sum(dim=1).tolist()
    m = len(tokens)
    rows, positions, targets = [], [], []
    for r, n in enumerate(lengths):
        for i, token in enumerate(tokens):
            pos = n - m - 1 + i  # the position whose logits predict label token i
            if pos >= 0:
                rows.append(r)
                positions.append(pos)
                targets.append(token)
    picked = logits[torch.tensor(rows), torch.tensor(positions)]  # (N, V)
    loss = torch.nn.functional.cross_entropy(
        picked, torch.tensor(targets, device=picked.device), reduction="sum"
    )
    (grad,) = torch.autograd.grad(loss, x)
    return grad.detach().float().cpu()


def _cosine(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity of ``a`` and ``b`` (B, T, C) over real positions: (B,)."""
    keep = mask.unsqueeze(-1).float()
    a, b = (a * keep).flatten(1).double(), (b * keep).flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


def infer_labels(pub: PublicModel, obs: SplitObservation, from_step: int = 0) -> dict[str, Any]:
    """Run the attack on every backward frame from optimizer step ``from_step`` on."""
    label_ids = pub.task.label_ids
    guesses: list[int] = []
    truths: list[int] = []
    for i in obs.frames_from(from_step):
        if i >= len(obs.grad):
            break
        grad, out, mask = obs.grad[i], obs.trunk_out[i], obs.mask[i]
        sims = torch.stack(
            [_cosine(_candidate_grads(pub, out, mask, ids), grad, mask) for ids in label_ids]
        )  # (K, B)
        guesses.extend(sims.argmax(dim=0).tolist())
        truths.extend(_row_labels(obs.labels[i], label_ids))
    known = [(g, t) for g, t in zip(guesses, truths, strict=True) if t >= 0]
    if not known:
        raise ValueError("no observed row carries a label of the task")
    hits = sum(g == t for g, t in known)
    majority = Counter(t for _, t in known).most_common(1)[0][1]
    return {
        "leakage": hits / len(known),
        "chance": majority / len(known),
        "rows": float(len(known)),
    }
