"""Split mode: the coordinator inverts the head activations it receives back into the silo's tokens.

Attacker
    The coordinator (it runs the trunk; with ``split.trunk_in_enclave`` its host instead).
Observes
    Every forward frame the trunk engine is handed, as decoded by :class:`TrunkService`: head
    outputs ``hidden (B, T, C)`` (after the silo's noise and the wire dtype) and the attention
    ``mask (B, T)``, recorded by :func:`~silotune.attacks.observe.observe_split`. With the trunk in
    the enclave: the relayed ciphertext only.
Knows in advance
    The public base model (so the head's architecture and untrained weights), the job's public
    config (``split.head_layers``, ``noise_sigma``, ``activation_dtype``, the prompt template
    and the label names), and public text that is not the silo's
    (:func:`~silotune.attacks.public.public_texts`).
Attacks
    * ``nearest`` (no training, no context): a table of the public head's output for every
      vocabulary token (alone at the first position; after the first token of the task's prompt
      elsewhere), and each received vector is mapped to its nearest row. The distance (L2 or
      cosine) is chosen on public text, never on the silo's.
    * ``learned``: a small inversion network (layer norm, a width-3 convolution over positions and
      a projection scored against the token table) trained on the public head's outputs for public
      text with the job's noise and wire dtype; it sees the neighbouring positions, so it can
      use context the table cannot.
    * ``ciphertext``: the enclave host's best use of what it relays: each frame's bytes read as
      float32 activations and mapped to the nearest table row.
Metric
    ``leakage`` = token recovery rate over real (unpadded) tokens; also the exact-sentence rate
    (rows whose every token is recovered) and the label recovery rate (rows whose label tokens,
    part of the input in classification, are recovered).
Chance
    The rate of always guessing the most frequent token of the observed batches (an attacker that
    knew the silo's token distribution but observed nothing).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

from silotune.attacks.observe import SplitObservation
from silotune.attacks.public import PublicModel, public_texts
from silotune.config import JobConfig
from silotune.data.tasks import _prompt_ids
from silotune.transport.frames import add_noise

__all__ = [
    "TokenTable",
    "invert_ciphertext",
    "invert_learned",
    "invert_nearest",
    "score_tokens",
    "token_table",
    "train_inverter",
]

log = logging.getLogger(__name__)

CHUNK = 4096  # vocabulary rows scored at once


# --------------------------------------------------------------------------- table


class TokenTable:
    """The public head's output per vocabulary token: at the first position and after a context."""

    def __init__(self, first: torch.Tensor, later: torch.Tensor, metric: str = "l2") -> None:
        self.first = first  # (V, C): token alone at position 0
        self.later = later  # (V, C): token at position 1 after the prompt's first token
        self.metric = metric

    def nearest(self, hidden: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, T)`` of the rows nearest to ``hidden (B, T, C)``."""
        guess = torch.empty(hidden.shape[:2], dtype=torch.long)
        guess[:, :1] = _nearest(hidden[:, :1], self.first, self.metric)
        if hidden.shape[1] > 1:
            guess[:, 1:] = _nearest(hidden[:, 1:], self.later, self.metric)
        return guess


def _nearest(hidden: torch.Tensor, table: torch.Tensor, metric: str) -> torch.Tensor:
    flat = hidden.reshape(-1, hidden.shape[-1]).double()  # (N, C)
    best = torch.full((flat.shape[0],), -float("inf"), dtype=torch.float64)
    arg = torch.zeros(flat.shape[0], dtype=torch.long)
    if metric == "cos":
        flat = flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    for start in range(0, table.shape[0], CHUNK):
        rows = table[start : start + CHUNK].double()  # (K, C)
        if metric == "cos":
            scores = flat @ (rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)).T
        else:  # argmax of x.r - |r|^2 / 2 = argmin of |x - r|^2
            scores = flat @ rows.T - 0.5 * (rows * rows).sum(-1)
        value, index = scores.max(-1)
        better = value > best
        best[better], arg[better] = value[better], index[better] + start
    return arg.reshape(hidden.shape[:2])


def _context_token(pub: PublicModel) -> int:
    """The token real positions follow: the BOS the tokenizer prepends, else the prompt's first."""
    return _prompt_ids(pub.tokenizer, pub.task.template.format(text="x"))[0]


@torch.no_grad()
def _head_rows(pub: PublicModel, first: int | None, batch: int = 2048) -> torch.Tensor:
    vocab = pub.embed.shape[0]
    rows = []
    for start in range(0, vocab, batch):
        ids = torch.arange(start, min(vocab, start + batch)).unsqueeze(1)  # (K, 1)
        if first is not None:
            ids = torch.cat([torch.full_like(ids, first), ids], dim=1)  # (K, 2)
        ids = ids.to(pub.device)
        out = pub.head(ids, torch.ones_like(ids))  # (K, T, C)
        rows.append(out[:, -1].float().cpu())
    return torch.cat(rows)  # (V, C)


def token_table(pub: PublicModel, cfg: JobConfig, calibrate_texts: int = 16) -> TokenTable:
    """Build the table and pick its distance (L2 or cosine) on public text, never the silo's."""
    table = TokenTable(_head_rows(pub, None), _head_rows(pub, _context_token(pub)))
    texts = public_texts(cfg, calibrate_texts, seed=1)
    ids, mask = _encode_public(pub, texts, seed=1)
    hidden = _observe_public(pub, cfg, ids, mask, torch.Generator().manual_seed(1))
    best = -1.0
    for metric in ("l2", "cos"):
        table.metric = metric
        rate = score_tokens(table.nearest(hidden), ids, mask)["leakage"]
        if rate > best:
            best, chosen = rate, metric
    table.metric = chosen
    log.info("Token table: %d rows; %s distance (%.1f%% on public text).", len(table.first),
             chosen, 100 * best)  # fmt: skip
    return table


# --------------------------------------------------------------------------- scoring


def score_tokens(
    guess: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None
) -> dict[str, float]:
    """Token recovery, exact-sentence and label recovery rates, and the chance baseline."""
    real = mask.bool()
    hit = (guess == truth) & real
    tokens = truth[real]
    out = {
        "leakage": float(hit.sum()) / max(1, int(real.sum())),
        "sentences": float((hit | ~real).all(dim=1).double().mean()),
        "chance": Counter(tokens.tolist()).most_common(1)[0][1] / max(1, tokens.numel()),
        "tokens": float(real.sum()),
    }
    if labels is not None:
        has = (labels != -100).any(dim=1)
        label_pos = labels != -100  # labels align with input_ids: the label tokens are inputs
        label_hit = (hit | ~label_pos).all(dim=1) & has
        out["label_recovery"] = float(label_hit.sum()) / max(1, int(has.sum()))
    return out


def _stack(obs: SplitObservation, frames: list[int]) -> tuple[torch.Tensor, ...]:
    width = max(obs.hidden[i].shape[1] for i in frames)

    def pad(t: torch.Tensor, value: float) -> torch.Tensor:
        extra = width - t.shape[1]
        if extra == 0:
            return t
        shape = (t.shape[0], extra, *t.shape[2:])
        return torch.cat([t, torch.full(shape, value, dtype=t.dtype)], dim=1)

    hidden = torch.cat([pad(obs.hidden[i], 0.0) for i in frames])
    mask = torch.cat([pad(obs.mask[i], 0) for i in frames])
    truth = torch.cat([pad(obs.input_ids[i], 0) for i in frames])
    labels = torch.cat([pad(obs.labels[i], -100) for i in frames])
    return hidden, mask, truth, labels


def invert_nearest(table: TokenTable, obs: SplitObservation, from_step: int = 0) -> dict[str, Any]:
    """The nearest-row attack on every forward frame from optimizer step ``from_step`` on."""
    hidden, mask, truth, labels = _stack(obs, obs.frames_from(from_step))
    return score_tokens(table.nearest(hidden), truth, mask, labels)


def invert_ciphertext(table: TokenTable, obs: SplitObservation, hidden_size: int) -> dict[str, Any]:
    """The enclave host's attack: the relayed bytes of each frame read as float32 activations.

    The host cannot tell forward frames from others by content; it takes, in order, every message
    towards the enclave long enough to hold a forward frame's activations and reads its last
    ``B * T * C * 4`` bytes (where a frame's tensor payload sits) as ``(B, T, C)``.
    """
    messages = [m for d, m in obs.relayed if d == "to_enclave"]
    scores = []
    used = 0
    for ids, mask, labels in zip(obs.input_ids, obs.attention, obs.labels, strict=True):
        need = ids.numel() * hidden_size * 4
        while used < len(messages) and len(messages[used]) < need:
            used += 1
        if used == len(messages):
            break
        raw = torch.frombuffer(bytearray(messages[used][-need:]), dtype=torch.float32)
        used += 1
        hidden = torch.nan_to_num(raw.reshape(*ids.shape, hidden_size), 0.0, 0.0, 0.0)
        hidden = hidden.clamp(-1e4, 1e4)
        scores.append((table.nearest(hidden), ids, mask, labels))
    if not scores:
        raise ValueError("the relay carried no message large enough to hold activations")
    guess = torch.cat([_pad_to(s[0], scores) for s in scores])
    truth = torch.cat([_pad_to(s[1], scores) for s in scores])
    mask = torch.cat([_pad_to(s[2], scores, 0) for s in scores])
    labels = torch.cat([_pad_to(s[3], scores, -100) for s in scores])
    return score_tokens(guess, truth, mask, labels)


def _pad_to(t: torch.Tensor, scores: list[Any], value: int = 0) -> torch.Tensor:
    width = max(s[1].shape[1] for s in scores)
    if t.shape[1] == width:
        return t
    return torch.cat([t, torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype)], 1)


# --------------------------------------------------------------------------- learned inversion


def _encode_public(
    pub: PublicModel, texts: list[str], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Public texts in the job's prompt format, each with a random public label: (ids, mask)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for text in texts:
        label = pub.task.label_ids[int(torch.randint(len(pub.task.label_ids), (1,), generator=gen))]
        ids = _prompt_ids(pub.tokenizer, pub.task.template.format(text=text))
        rows.append(ids[: pub.task.max_length - len(label)] + label)
    width = max(len(r) for r in rows)
    pad = pub.tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


@torch.no_grad()
def _observe_public(
    pub: PublicModel, cfg: JobConfig, ids: torch.Tensor, mask: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """What the trunk would receive for these public rows: public head, job noise, wire dtype."""
    hidden = pub.head(ids.to(pub.device), mask.to(pub.device)).float().cpu()  # (B, T, C)
    hidden = add_noise(hidden, cfg.split.noise_sigma, gen)
    dtype = cfg.split.activation_dtype
    if dtype != "float32":
        hidden = hidden.to(getattr(torch, dtype)).float()
    return hidden


class Inverter(nn.Module):
    """Received activations ``(B, T, C)`` -> token scores, with a width-3 view of the context."""

    def __init__(self, hidden: int, table: torch.Tensor, width: int = 512) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.conv = nn.Conv1d(hidden, width, kernel_size=3, padding=1)
        self.mix = nn.Linear(width, hidden)
        self.skip = nn.Linear(hidden, hidden)
        rows = table / table.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.register_buffer("rows", rows.float())  # (V, C), frozen
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.bias = nn.Parameter(torch.zeros(table.shape[0]))

    def embed(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.norm(hidden)  # (B, T, C)
        context = torch.nn.functional.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        y = self.skip(x) + self.mix(context)  # (B, T, C)
        return y / y.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    def scores(self, y: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        rows, bias = (self.rows, self.bias) if ids is None else (self.rows[ids], self.bias[ids])
        return self.scale * y @ rows.T + bias  # (..., K)

    @torch.no_grad()
    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        y = self.embed(hidden)
        best = torch.full(y.shape[:2], -float("inf"))
        arg = torch.zeros(y.shape[:2], dtype=torch.long)
        for start in range(0, self.rows.shape[0], CHUNK):
            ids = torch.arange(start, min(start + CHUNK, self.rows.shape[0]))
            value, index = self.scores(y, ids).max(-1)
            better = value > best
            best[better], arg[better] = value[better], index[better] + start
        return arg


def train_inverter(
    pub: PublicModel,
    table: TokenTable,
    cfg: JobConfig,
    texts: int = 2000,
    steps: int = 300,
    batch: int = 16,
    negatives: int = 2048,
    seed: int = 0,
) -> Inverter:
    """Train an :class:`Inverter` on the public head's outputs for public text only."""
    torch.manual_seed(seed)
    corpus = public_texts(cfg, texts, seed=seed)
    model = Inverter(table.later.shape[1], table.later)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    vocab = table.later.shape[0]
    for step in range(steps):
        picks = torch.randint(len(corpus), (batch,), generator=gen).tolist()
        ids, mask = _encode_public(pub, [corpus[i] for i in picks], seed=seed + step)
        hidden = _observe_public(pub, cfg, ids, mask, gen)
        real = mask.bool()
        targets = ids[real]  # (N,)
        candidates = torch.unique(torch.cat([targets, torch.randint(vocab, (negatives,))]))
        where = torch.searchsorted(candidates, targets)
        logits = model.scores(model.embed(hidden)[real], candidates)  # (N, K)
        loss = torch.nn.functional.cross_entropy(logits, where)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("Inverter step %d/%d: loss %.3f", step + 1, steps, float(loss.detach()))
    model.eval()
    return model


def invert_learned(model: Inverter, obs: SplitObservation, from_step: int = 0) -> dict[str, Any]:
    """The learned attack on every forward frame from optimizer step ``from_step`` on."""
    hidden, mask, truth, labels = _stack(obs, obs.frames_from(from_step))
    return score_tokens(model.predict(hidden), truth, mask, labels)
