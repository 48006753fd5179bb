"""P-tuning v2 prefixes in split mode: each side owns the prefix of the layers it runs.

PEFT's prefix tuning (``prefix_projection=False``) keeps one embedding ``(P, L * 2 * H_kv * D)``:
for every virtual token, the key and the value of every layer. Viewed as ``(P, L, 2, H_kv, D)``
it cuts by layer, so the silo holds the rows of its head and tail layers and the coordinator those
of its trunk layers (issue 5: the prefix of trunk layers lives with the trunk). Each side wraps its
parts in :class:`PrefixedPart`, which owns one ``(P, 2, H_kv, D)`` parameter per layer and feeds
the part its per-block ``(key, value)`` pairs, expanded to the batch (a client-batching trunk
therefore expands its prefix to the concatenated batch of every silo).

The per-layer tensors travel and are averaged under the names ``prefix.layers.<i>``;
:func:`assemble_prompt_embeddings` stacks all ``L`` of them back into PEFT's
``prompt_embeddings`` tensor, so the saved adapter loads with ``PeftModel.from_pretrained``.

Position convention: PEFT's, so that a split prefix step equals the centralized trainer's step and
the saved adapter behaves under plain PEFT as it did in training. The tokens sit at positions
``P, P+1, ...`` after the ``P`` virtual tokens: :class:`PrefixedPart` sets the wrapped part's
``position_offset`` to ``P``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from silotune.errors import ModelError

__all__ = [
    "PREFIX_STATE",
    "PrefixedPart",
    "assemble_prompt_embeddings",
    "is_prefix_state",
    "prefix_embedding",
    "prefix_shape",
]

PREFIX_STATE = "prefix.layers."
"""Name stem of one layer's prefix tensor in adapter states: ``prefix.layers.3``."""


def prefix_shape(model: PeftModel) -> tuple[int, int, int, int]:
    """``(P, L, H_kv, D)`` of the active PEFT prefix-tuning adapter of ``model``."""
    config: Any = model.peft_config[model.active_adapter]  # a PrefixTuningConfig
    heads = int(config.num_attention_heads)
    return (
        int(config.num_virtual_tokens),
        int(config.num_layers),
        heads,
        int(config.token_dim) // heads,
    )


def prefix_embedding(model: PeftModel) -> nn.Embedding:
    """PEFT's prefix table of the active adapter: an embedding ``(P, L * 2 * H_kv * D)``."""
    encoder = model.prompt_encoder[model.active_adapter]
    embedding = getattr(encoder, "embedding", None)
    if not isinstance(embedding, nn.Embedding) or getattr(encoder, "prefix_projection", False):
        raise ModelError(
            "split mode needs PEFT prefix tuning without prefix_projection (one embedding of "
            "(P, L * 2 * H_kv * D)); this adapter has another prompt encoder"
        )
    return embedding


class PrefixedPart(nn.Module):
    """A split part plus the learnable prefix of its blocks.

    Parameters
    ----------
    part
        A head, trunk or tail of :func:`~silotune.models.slicing.split_model`.
    model
        The PEFT prefix-tuning model the part was cut from; its (seeded) prefix embedding gives
        the initial values, so both sides start where the centralized trainer starts.
    """

    def __init__(self, part: nn.Module, model: PeftModel) -> None:
        super().__init__()
        self.part = part
        self.layer_indices: tuple[int, ...] = tuple(getattr(part, "layer_indices", ()))
        tokens, layers, heads, dim = prefix_shape(model)
        # PEFT's convention: the tokens sit at positions P, P+1, ... after the virtual tokens
        # (every part, even a GPT-2 head without blocks, whose position embedding needs it).
        part.position_offset = tokens
        weight = prefix_embedding(model).weight.detach()
        table = weight.view(tokens, layers, 2, heads, dim)  # (P, L, 2, H_kv, D)
        self.prefix_layers = nn.ParameterDict(
            {str(i): nn.Parameter(table[:, i].clone()) for i in self.layer_indices}
        )  # each (P, 2, H_kv, D)

    def pairs(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One ``(key, value)`` pair per block, each ``(B, H_kv, P, D)``."""
        out = []
        for i in self.layer_indices:
            kv = self.prefix_layers[str(i)].permute(1, 2, 0, 3)  # (2, H_kv, P, D)
            kv = kv.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)  # (2, B, H_kv, P, D)
            out.append((kv[0], kv[1]))
        return out

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the part with its prefix: ``(B, T)`` ids or ``(B, T, C)`` states -> its output."""
        result: torch.Tensor = self.part(
            inputs, attention_mask, prefix=self.pairs(attention_mask.shape[0])
        )
        return result

    def state_names(self) -> dict[str, str]:
        """Local parameter name -> adapter-state name (``prefix.layers.<i>``)."""
        return {f"prefix_layers.{i}": f"{PREFIX_STATE}{i}" for i in self.layer_indices}


def is_prefix_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` holds split prefix tensors (``prefix.layers.<i>``)."""
    return any(name.startswith(PREFIX_STATE) for name in state)


def assemble_prompt_embeddings(state: Mapping[str, torch.Tensor], model: PeftModel) -> torch.Tensor:
    """Stack every layer's prefix into PEFT's ``prompt_embeddings`` ``(P, L * 2 * H_kv * D)``.

    Raises
    ------
    ModelError
        If a layer's tensor is missing or has the wrong shape.
    """
    tokens, layers, heads, dim = prefix_shape(model)
    rows = []
    for i in range(layers):
        tensor = state.get(f"{PREFIX_STATE}{i}")
        if tensor is None or tuple(tensor.shape) != (tokens, 2, heads, dim):
            got = None if tensor is None else tuple(tensor.shape)
            raise ModelError(
                f"the prefix of layer {i} is {got}; a complete prefix adapter needs "
                f"({tokens}, 2, {heads}, {dim}) for each of the {layers} layers"
            )
        rows.append(tensor.detach().cpu())
    table = torch.stack(rows, dim=1)  # (P, L, 2, H_kv, D)
    return table.reshape(tokens, layers * 2 * heads * dim).contiguous()
