"""Score every label of a classification example in one pass over its prompt.

The per-label scorer runs ``prompt + label`` once per label: K forwards of the whole prompt for K
labels. Here each example becomes one row ``prompt, label_1[:-1], label_2[:-1], ...`` with a
segment mask (:mod:`silotune.models.segments`): every label's tokens see the prompt and their own
earlier tokens only, at the positions they would have alone after the prompt. A label's first
token is predicted from the prompt's last position, so single-token labels add nothing to the row
and a label's last token is never fed in. When the prompt and the labels do not fit in
``max_length`` tokens, the labels are spread over several rows of the same prompt.

The model is called in one of three ways (:func:`packed_logits`):

- a model that sets ``accepts_segment_mask`` (split mode's silo model, whose head, trunk and tail
  each rebuild the attention from the 2-D segment mask) gets the segment mask itself;
- a PEFT P-tuning v2 model gets its prefix as the cache and a 4-D mask that shows it to every
  token (PEFT's own forward would concatenate a 2-D mask);
- any other causal LM (plain, LoRA, SPF, the enclave's) gets the 4-D mask and position ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from silotune.models.segments import segment_attention, segment_positions
from silotune.progress import ProgressHook

__all__ = ["PackedRow", "pack_rows", "packed_logits", "score_one_pass"]


@dataclass(frozen=True)
class PackedRow:
    """One row of packed continuations of one example's prompt.

    ``targets`` holds ``(source, token, label)``: the log-probability of ``token`` at the output of
    position ``source`` counts towards label index ``label`` of example ``example``.
    """

    example: int
    input_ids: list[int]
    segments: list[int]
    targets: list[tuple[int, int, int]]


def _groups(prompt_len: int, label_ids: list[list[int]], max_length: int) -> list[list[int]]:
    """Label indices per row: as many labels as fit after the prompt, at least one per row."""
    groups: list[list[int]] = [[]]
    used = prompt_len
    for j, ids in enumerate(label_ids):
        extra = len(ids) - 1  # a label's last token is never an input
        if groups[-1] and used + extra > max_length:
            groups.append([])
            used = prompt_len
        groups[-1].append(j)
        used += extra
    return groups


def pack_rows(
    prompts: list[list[int]], label_ids: list[list[int]], max_length: int
) -> list[PackedRow]:
    """Pack each prompt with the continuations of every label (see the module docstring)."""
    rows = []
    for example, prompt in enumerate(prompts):
        last = len(prompt) - 1
        for group in _groups(len(prompt), label_ids, max_length):
            ids, segments = list(prompt), [1] * len(prompt)
            targets: list[tuple[int, int, int]] = []
            branch = 1
            for j in group:
                label = label_ids[j]
                if len(label) > 1:
                    branch += 1
                start = len(ids)
                for t, token in enumerate(label):
                    targets.append((last if t == 0 else start + t - 1, token, j))
                ids += label[:-1]
                segments += [branch] * (len(label) - 1)
            rows.append(PackedRow(example, ids, segments, targets))
    return rows


def packed_logits(
    model: nn.Module, input_ids: torch.Tensor, segments: torch.Tensor
) -> torch.Tensor:
    """Logits ``(B, T, V)`` of a batch of packed rows (``input_ids`` and ``segments`` ``(B, T)``)."""
    if getattr(model, "accepts_segment_mask", False):
        return model(input_ids=input_ids, attention_mask=segments).logits  # type: ignore[no-any-return]
    dtype = model.get_input_embeddings().weight.dtype  # type: ignore[operator]
    positions = segment_positions(segments)  # (B, T)
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "peft_type", None) == "PREFIX_TUNING":
        prefix = config.num_virtual_tokens
        out = model.base_model(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=segment_attention(segments, dtype, prefix),  # (B, 1, T, P + T)
            position_ids=positions + prefix,  # PEFT places the tokens after the P virtual ones
            past_key_values=model.get_prompt(input_ids.shape[0]),  # type: ignore[operator]
        )
        return out.logits  # type: ignore[no-any-return]
    out = model(
        input_ids=input_ids,
        attention_mask=segment_attention(segments, dtype),  # (B, 1, T, T)
        position_ids=positions,
    )
    return out.logits  # type: ignore[no-any-return]


def score_one_pass(
    model: nn.Module,
    prompts: list[list[int]],
    label_ids: list[list[int]],
    max_length: int,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    on_progress: ProgressHook | None = None,
) -> torch.Tensor:
    """Log-likelihood of every label after every prompt, ``(N, K)``; rows batched by length."""
    rows = sorted(pack_rows(prompts, label_ids, max_length), key=lambda r: len(r.input_ids))
    scores = torch.zeros(len(prompts), len(label_ids), dtype=torch.float64)
    total = -(-len(rows) // batch_size)
    for done, start in enumerate(range(0, len(rows), batch_size), start=1):
        batch = rows[start : start + batch_size]
        width = max(len(r.input_ids) for r in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        segments = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            input_ids[i, : len(row.input_ids)] = torch.tensor(row.input_ids)
            segments[i, : len(row.segments)] = torch.tensor(row.segments)
        logits = packed_logits(model, input_ids.to(device), segments.to(device))  # (B, T, V)
        where = [
            (i, src, tok, r.example, j) for i, r in enumerate(batch) for src, tok, j in r.targets
        ]
        picked = logits[[w[0] for w in where], [w[1] for w in where]].float()  # (N, V)
        tokens = torch.tensor([w[2] for w in where], device=picked.device)
        logp = torch.log_softmax(picked, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        examples = torch.tensor([w[3] for w in where])
        labels = torch.tensor([w[4] for w in where])
        scores.index_put_((examples, labels), logp.double().cpu(), accumulate=True)
        if on_progress is not None:
            on_progress(done, total)
    return scores
