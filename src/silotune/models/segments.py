"""Segment masks: several continuations of one prompt packed in one row, for one-pass scoring.

A segment mask is a 2-D ``(B, T)`` integer tensor that generalises the 0/1 padding mask:

- ``0``: padding;
- ``1``: the shared prompt;
- ``2, 3, ...``: one continuation (branch) each, placed after the prompt.

A token attends to the earlier prompt tokens and to the earlier tokens of its own branch, never to
another branch, and its position id counts the prompt and its own branch only. So each branch
sees exactly what it would see alone after the prompt (``prompt + branch`` as its own row), and
scoring K continuations costs one pass over the prompt instead of K. A 0/1 mask is a segment mask
with no branches, and gives the usual causal attention and positions.
"""

from __future__ import annotations

import torch

from silotune.errors import ModelError

__all__ = ["MAX_SEGMENT", "is_segmented", "segment_attention", "segment_positions"]

MAX_SEGMENT = 257  # the prompt (1) and at most 256 branches in one row


def is_segmented(mask: torch.Tensor) -> bool:
    """True if ``mask`` holds branch ids (values above 1), not only padding and one prompt."""
    return bool((mask > 1).any())


def segment_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``(B, T)``: prompt tokens 0, 1, ...; branch tokens continue after the prompt.

    Padding gets 1, as :func:`silotune.models.slicing_parts.position_ids_from_mask` gives it.
    """
    mask = mask.long()
    prompt = (mask == 1).long().cumsum(-1)  # prompt tokens up to and including each position
    own = torch.zeros_like(mask)
    for branch in mask.unique().tolist():
        if branch > 1:
            own += (mask == branch).long().cumsum(-1) * (mask == branch)
    positions = prompt * (mask == 1) + (prompt + own) * (mask > 1) - 1
    return positions.masked_fill(mask == 0, 1)


def segment_attention(mask: torch.Tensor, dtype: torch.dtype, prefix: int = 0) -> torch.Tensor:
    """The additive 4-D attention mask ``(B, 1, T, prefix + T)`` of a segment mask.

    0 where a query may attend, the dtype's minimum elsewhere (the form every attention
    implementation of ``transformers`` accepts as a ready 4-D mask). ``prefix`` columns in front
    (a P-tuning v2 prefix) are visible to every token. A padding query attends to itself only, so
    that no row of the softmax is empty.
    """
    if mask.dim() != 2:
        raise ModelError(f"a segment mask must be 2-D (B, T), got shape {tuple(mask.shape)}")
    if bool((mask < 0).any()) or bool((mask > MAX_SEGMENT).any()):
        raise ModelError(f"segment ids must lie in 0..{MAX_SEGMENT}")
    seg = mask.long()
    tokens = seg.shape[1]
    query, key = seg.unsqueeze(2), seg.unsqueeze(1)  # (B, T, 1), (B, 1, T)
    causal = torch.ones(tokens, tokens, dtype=torch.bool, device=seg.device).tril()
    visible = causal & (query != 0) & (key != 0) & ((key == 1) | (key == query))  # (B, T, T)
    visible |= torch.eye(tokens, dtype=torch.bool, device=seg.device)  # padding sees itself
    if prefix:
        shown = torch.ones(seg.shape[0], tokens, prefix, dtype=torch.bool, device=seg.device)
        visible = torch.cat([shown, visible], dim=2)  # (B, T, P + T)
    blocked = torch.zeros(visible.shape, dtype=dtype, device=seg.device)
    blocked.masked_fill_(~visible, torch.finfo(dtype).min)
    return blocked.unsqueeze(1)  # (B, 1, T, P + T)
