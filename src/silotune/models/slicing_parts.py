"""The head, trunk and tail modules of a split causal LM; each rebuilds masks and positions locally.

Every part is a view on blocks of the original model (same modules, same ``Parameter`` objects).
Its ``forward`` takes only what a network frame carries, the tokens or hidden states and the 2-D
``attention_mask (B, T)``, plus an optional per-block P-tuning v2 prefix, and rebuilds from the
mask alone the position ids (:func:`position_ids_from_mask`), the 4-D causal/padding (and
sliding-window) masks and, for rotary models, the rotary embeddings. See
:mod:`silotune.models.slicing` for the conventions and :func:`~silotune.models.slicing.split_model`
for how a model is cut.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from silotune.errors import ModelError
from silotune.models.segments import is_segmented, segment_attention, segment_positions

__all__ = [
    "DecoderHead",
    "DecoderTail",
    "DecoderTrunk",
    "GPT2Head",
    "GPT2Tail",
    "GPT2Trunk",
    "PrefixKV",
    "SplitPart",
    "position_ids_from_mask",
]

PrefixKV = Sequence[tuple[torch.Tensor, torch.Tensor]]
"""Per-block P-tuning v2 prefix: one ``(key, value)`` pair per block, each ``(B, H_kv, P, D)``."""

# How each attention kind's 4-D mask is built, as in the Hugging Face model classes.
_MASK_BUILDERS: dict[str, Callable[..., torch.Tensor | None]] = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that every part (and a matching full-model call) uses for a padded batch.

    Parameters
    ----------
    attention_mask
        ``(B, T)``, 1 for a real token and 0 for padding.

    Returns
    -------
    torch.Tensor
        ``(B, T)`` long tensor: the index of each real token among the real tokens of its row
        (0, 1, 2, ...), and 1 at padding (as ``transformers``' ``generate`` does). A segment mask
        (:mod:`silotune.models.segments`) gives each branch the positions after the prompt.
    """
    if is_segmented(attention_mask):  # several continuations packed after one prompt
        return segment_positions(attention_mask)
    mask = attention_mask.long()  # (B, T)
    position_ids = mask.cumsum(-1) - 1  # (B, T)
    return position_ids.masked_fill(mask == 0, 1)


class SplitPart(nn.Module):
    """A contiguous run of decoder blocks plus the shared checks and prefix handling.

    ``layer_indices`` holds the global indices of the part's blocks in the model. Each
    architecture's part class defines ``_run_blocks(hidden_states, attention_mask, prefix)``.
    """

    _run_blocks: Callable[[torch.Tensor, torch.Tensor, PrefixKV | None], torch.Tensor]

    def __init__(
        self,
        config: PretrainedConfig,
        first_layer: int,
        blocks: Sequence[nn.Module],
        blocks_name: str,
    ) -> None:
        super().__init__()
        self.config = config
        # Added to every token position. 0: the tokens start at 0 and a prefix takes no position.
        # Split mode's P-tuning v2 sets it to P, as PEFT's forward places the tokens after the
        # P virtual tokens, so split and centralized prefix training compute the same function.
        self.position_offset = 0
        self.layer_indices: tuple[int, ...] = tuple(range(first_layer, first_layer + len(blocks)))
        # Keyed by the global layer index so that state-dict keys match the model's
        # (``layers.3.self_attn...`` here, ``model.layers.3.self_attn...`` there).
        self._blocks_name = blocks_name
        self.add_module(
            blocks_name,
            nn.ModuleDict(
                {str(i): block for i, block in zip(self.layer_indices, blocks, strict=True)}
            ),
        )

    @property
    def blocks(self) -> nn.ModuleDict:
        """The part's decoder blocks, keyed by their global layer index."""
        blocks: nn.ModuleDict = getattr(self, self._blocks_name)
        return blocks

    def _checked_mask(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The 2-D mask on the tokens' device; ModelError unless it is ``(B, T)`` of the tokens."""
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(tokens.shape[:2]):
            raise ModelError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; it must be 2-D (B, T) "
                f"= {tuple(tokens.shape[:2])}, with 1 for real tokens and 0 for padding."
            )
        return attention_mask.to(tokens.device)

    def _check_hidden(self, hidden_states: torch.Tensor) -> None:
        """Reject hidden states that are not ``(B, T, hidden_size)``."""
        hidden_size = self.config.hidden_size
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != hidden_size:
            raise ModelError(
                f"hidden_states has shape {tuple(hidden_states.shape)}; it must be (B, T, "
                f"{hidden_size}) for this model."
            )

    def _blocks_forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix: PrefixKV | None,
    ) -> torch.Tensor:
        """Check the inputs, then run the part's blocks: ``(B, T, C)`` to ``(B, T, C)``."""
        self._check_hidden(hidden_states)
        attention_mask = self._checked_mask(hidden_states, attention_mask)
        return self._run_blocks(hidden_states, attention_mask, prefix)

    def _prefix_cache(
        self, prefix: PrefixKV | None, attention_mask: torch.Tensor
    ) -> tuple[DynamicCache | None, torch.Tensor]:
        """Build the cache holding the prefix and the 2-D mask over prefix + tokens.

        Returns ``(None, attention_mask)`` without a prefix, else a fresh ``DynamicCache`` whose
        entries at this part's global layer indices hold the prefix (the blocks address the cache
        by their own ``layer_idx``) and the mask ``(B, P + T)`` with ones over the prefix.
        """
        if prefix is None or len(self.layer_indices) == 0:
            if prefix is not None and len(prefix) != 0:
                raise ModelError(
                    f"prefix has {len(prefix)} (key, value) pairs but this part has no blocks; "
                    "pass None or an empty sequence."
                )
            return None, attention_mask
        if any(
            getattr(b, "gradient_checkpointing", False) and b.training for b in self.blocks.values()
        ):
            raise ModelError(
                "A prefix cannot be used while gradient checkpointing is on in training (the "
                "blocks would drop it); call model.gradient_checkpointing_disable() or pass "
                "no prefix."
            )
        if len(prefix) != len(self.layer_indices):
            raise ModelError(
                f"prefix has {len(prefix)} (key, value) pairs; this part has "
                f"{len(self.layer_indices)} blocks (layers {list(self.layer_indices)}), "
                "one pair each."
            )
        batch_size = attention_mask.shape[0]
        prefix_len = prefix[0][0].shape[-2]
        for key, value in prefix:
            if key.dim() != 4 or key.shape[0] != batch_size or key.shape[-2] != prefix_len:
                raise ModelError(
                    f"a prefix key has shape {tuple(key.shape)}; every key and value must be "
                    f"(B={batch_size}, H_kv, P={prefix_len}, D)."
                )
            if value.shape != key.shape:
                raise ModelError(
                    f"a prefix value has shape {tuple(value.shape)} but its key has "
                    f"{tuple(key.shape)}; they must match."
                )
        device = attention_mask.device
        empty = [(None, None)] * self.layer_indices[0]
        cache = DynamicCache([*empty, *((k.to(device), v.to(device)) for k, v in prefix)])
        prefix_mask = attention_mask.new_ones(batch_size, prefix_len)  # (B, P)
        return cache, torch.cat([prefix_mask, attention_mask], dim=1)  # (B, P + T)

    def _attention(
        self,
        kind: str,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        full_mask: torch.Tensor,
        cache: DynamicCache | None,
        position_ids: torch.Tensor,
    ) -> torch.Tensor | None:
        """The 4-D mask of one attention kind, as the Hugging Face model builds it.

        ``full_mask`` is ``(B, P + T)`` with a prefix. A segment mask (packed continuations,
        :mod:`silotune.models.segments`) gets its own 4-D mask, for full attention only.
        """
        if not is_segmented(attention_mask):
            return _MASK_BUILDERS[kind](
                config=self.config,
                inputs_embeds=hidden_states,
                attention_mask=full_mask,
                past_key_values=cache,
                position_ids=position_ids,
                layer_idx=self.layer_indices[0],
            )
        if kind != "full_attention":
            raise ModelError(
                f"packed continuations (a segment mask) need full attention; this model has "
                f"'{kind}' layers"
            )
        prefix = full_mask.shape[1] - attention_mask.shape[1]
        return segment_attention(attention_mask, hidden_states.dtype, prefix)  # (B, 1, T, P + T)


class _TrunkForward(SplitPart):
    """Forward of a trunk: its blocks only (shared by every architecture)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix: PrefixKV | None = None,
    ) -> torch.Tensor:
        """Map hidden states ``(B, T, C)`` and ``attention_mask (B, T)`` to ``(B, T, C)``."""
        return self._blocks_forward(hidden_states, attention_mask, prefix)  # (B, T, C)


class _TailForward(SplitPart, metaclass=ABCMeta):
    """Forward of a tail: its blocks, the final norm and the LM head (every architecture)."""

    @abstractmethod
    def final_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The architecture's final normalisation (named as in its checkpoints)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix: PrefixKV | None = None,
    ) -> torch.Tensor:
        """Map hidden states ``(B, T, C)`` and ``attention_mask (B, T)`` to logits ``(B, T, V)``."""
        hidden_states = self._blocks_forward(hidden_states, attention_mask, prefix)  # (B, T, C)
        return self.lm_head(self.final_norm(hidden_states))  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- Llama family


class _DecoderPart(SplitPart):
    """Blocks of a Llama-family model (Llama, Qwen2, Mistral) with its shared rotary module."""

    def __init__(
        self,
        config: PretrainedConfig,
        first_layer: int,
        blocks: Sequence[nn.Module],
        layer_types: Sequence[str],
        rotary_emb: nn.Module,
    ) -> None:
        super().__init__(config, first_layer, blocks, "layers")
        self.layer_types = tuple(layer_types)
        self.rotary_emb = rotary_emb

    def _run_blocks(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix: PrefixKV | None,
    ) -> torch.Tensor:
        """Run the blocks as ``LlamaModel.forward`` / ``Qwen2Model`` / ``MistralModel`` do."""
        if len(self.layer_indices) == 0:
            self._prefix_cache(prefix, attention_mask)  # still validates the prefix
            return hidden_states
        position_ids = position_ids_from_mask(attention_mask) + self.position_offset  # (B, T)
        cache, full_mask = self._prefix_cache(prefix, attention_mask)  # full_mask (B, P + T)
        masks = {
            kind: self._attention(
                kind, hidden_states, attention_mask, full_mask, cache, position_ids
            )
            for kind in set(self.layer_types)
        }  # each (B, 1, T, P + T), or None where sdpa's is_causal suffices
        position_embeddings = self.rotary_emb(hidden_states, position_ids)  # cos, sin (B, T, D)
        for block, kind in zip(self.blocks.values(), self.layer_types, strict=True):
            hidden_states = block(
                hidden_states,
                attention_mask=masks[kind],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=False,
            )  # (B, T, C)
        return hidden_states


class DecoderHead(_DecoderPart):
    """Token embeddings + the first blocks of a Llama-family model (runs on the silo)."""

    def __init__(self, embed_tokens: nn.Module, **part: Any) -> None:
        super().__init__(**part)
        self.embed_tokens = embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix: PrefixKV | None = None,
    ) -> torch.Tensor:
        """Map ``input_ids (B, T)`` and ``attention_mask (B, T)`` to hidden states ``(B, T, C)``."""
        attention_mask = self._checked_mask(input_ids, attention_mask)
        hidden_states = self.embed_tokens(input_ids)  # (B, T, C)
        return self._run_blocks(hidden_states, attention_mask, prefix)  # (B, T, C)


class DecoderTrunk(_TrunkForward, _DecoderPart):
    """The middle blocks of a Llama-family model (runs on the coordinator)."""


class DecoderTail(_TailForward, _DecoderPart):
    """The last blocks + final norm + LM head of a Llama-family model (runs on the silo)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module, **part: Any) -> None:
        super().__init__(**part)
        self.norm = norm
        self.lm_head = lm_head

    def final_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden_states)  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- GPT-2


class _GPT2Part(SplitPart):
    """Blocks of a GPT-2 model (learned absolute positions, added in the head only)."""

    def __init__(self, config: PretrainedConfig, first_layer: int, blocks: Sequence[nn.Module]):
        super().__init__(config, first_layer, blocks, "h")

    def _run_blocks(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix: PrefixKV | None,
    ) -> torch.Tensor:
        """Run the blocks as ``GPT2Model.forward`` does."""
        if len(self.layer_indices) == 0:
            self._prefix_cache(prefix, attention_mask)  # still validates the prefix
            return hidden_states
        position_ids = position_ids_from_mask(attention_mask) + self.position_offset  # (B, T)
        cache, full_mask = self._prefix_cache(prefix, attention_mask)  # full_mask (B, P + T)
        causal_mask = self._attention(
            "full_attention", hidden_states, attention_mask, full_mask, cache, position_ids
        )  # (B, 1, T, P + T), or None where sdpa's is_causal suffices
        for block in self.blocks.values():
            hidden_states = block(
                hidden_states,
                cache,
                causal_mask,
                None,  # encoder_hidden_states, positional as in GPT2Model
                encoder_attention_mask=None,
                use_cache=False,
                position_ids=position_ids,
            )  # (B, T, C)
        return hidden_states


class GPT2Head(_GPT2Part):
    """Token + position embeddings + the first blocks of GPT-2 (runs on the silo)."""

    def __init__(self, wte: nn.Module, wpe: nn.Module, drop: nn.Module, **part: Any) -> None:
        super().__init__(**part)
        self.wte = wte
        self.wpe = wpe
        self.drop = drop

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix: PrefixKV | None = None,
    ) -> torch.Tensor:
        """Map ``input_ids (B, T)`` and ``attention_mask (B, T)`` to hidden states ``(B, T, C)``."""
        attention_mask = self._checked_mask(input_ids, attention_mask)
        position_ids = position_ids_from_mask(attention_mask) + self.position_offset  # (B, T)
        hidden_states = self.wte(input_ids) + self.wpe(position_ids)  # (B, T, C)
        hidden_states = self.drop(hidden_states)
        return self._run_blocks(hidden_states, attention_mask, prefix)  # (B, T, C)


class GPT2Trunk(_TrunkForward, _GPT2Part):
    """The middle blocks of GPT-2 (runs on the coordinator)."""


class GPT2Tail(_TailForward, _GPT2Part):
    """The last blocks + final layer norm + LM head of GPT-2 (runs on the silo)."""

    def __init__(self, ln_f: nn.Module, lm_head: nn.Module, **part: Any) -> None:
        super().__init__(**part)
        self.ln_f = ln_f
        self.lm_head = lm_head

    def final_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.ln_f(hidden_states)  # type: ignore[no-any-return]
