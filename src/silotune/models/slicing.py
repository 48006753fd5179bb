"""Slice a causal LM into head, trunk and tail parts for U-shaped split learning (FL-GLM style).

A silo keeps the head (embeddings + first ``h`` blocks) and the tail (last ``t`` blocks + final
norm + LM head); the coordinator runs the trunk (the blocks in between). The parts are views on the
original model: they hold the very same submodules and ``Parameter`` objects (LoRA layers that PEFT
injected included), so training a part trains the model and nothing is copied.

What crosses between parts is only what a network frame carries:

* head:  ``input_ids (B, T)`` + ``attention_mask (B, T)``  ->  ``hidden_states (B, T, C)``
* trunk: ``hidden_states (B, T, C)`` + ``attention_mask (B, T)``  ->  ``hidden_states (B, T, C)``
* tail:  ``hidden_states (B, T, C)`` + ``attention_mask (B, T)``  ->  ``logits (B, T, V)``

The 2-D mask uses 1 for a real token and 0 for padding; left and right padding both work. Every
part rebuilds locally, from that mask alone, the 4-D causal/padding (and sliding-window) masks,
the position ids and, for rotary models, the rotary embeddings (from the model's own, shared,
rotary module). Position ids never travel: they are :func:`position_ids_from_mask`, the convention
Hugging Face's ``generate`` uses. For right padding they equal the ``arange(T)`` that a plain
``model(input_ids, attention_mask)`` call uses at every real token; for left padding they make a
padded row give the same logits as the unpadded one. To reproduce a part exactly with the full
model, call it with ``position_ids=position_ids_from_mask(attention_mask)``.

Each part's ``forward`` also takes an optional P-tuning v2 ``prefix``: one ``(key, value)`` pair
per block of that part, each ``(B, H_kv, P, D)``, exactly the per-layer tensors PEFT's prefix
tuning puts in a ``DynamicCache`` (:meth:`SplitParts.split_prefix` cuts a whole-model prefix into
the three parts'). Every real token attends to the prefix. Token positions are those of the
``(B, T)`` mask plus each part's ``position_offset`` (0 by default: the prefix takes no position,
ChatGLM's P-tuning v2 convention; split mode sets it to ``P``, PEFT's convention, in which the
tokens follow the ``P`` virtual tokens). With offset 0 the matching full-model call is::

    model(input_ids, attention_mask=torch.cat([torch.ones(B, P), mask], 1),
          position_ids=position_ids_from_mask(mask), past_key_values=DynamicCache(prefix))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peft import PeftModel
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from silotune.errors import ModelError
from silotune.models.slicing_parts import (
    DecoderHead,
    DecoderTail,
    DecoderTrunk,
    GPT2Head,
    GPT2Tail,
    GPT2Trunk,
    PrefixKV,
    SplitPart,
    position_ids_from_mask,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "PrefixKV",
    "SplitPart",
    "SplitParts",
    "position_ids_from_mask",
    "split_model",
]

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "MistralForCausalLM",
    "GPT2LMHeadModel",
)


@dataclass
class SplitParts:
    """The three parts of a split model; each shares its parameters with the original model.

    Attributes
    ----------
    head
        ``head(input_ids (B, T), attention_mask (B, T), prefix=None) -> (B, T, C)``.
    trunk
        ``trunk(hidden_states (B, T, C), attention_mask (B, T), prefix=None) -> (B, T, C)``.
    tail
        ``tail(hidden_states (B, T, C), attention_mask (B, T), prefix=None) -> (B, T, V)``.
    """

    head: SplitPart
    trunk: SplitPart
    tail: SplitPart

    def split_prefix(self, prefix: PrefixKV) -> tuple[PrefixKV, PrefixKV, PrefixKV]:
        """Cut a whole-model prefix (one ``(key, value)`` pair per layer) into the parts' prefixes.

        Parameters
        ----------
        prefix
            One ``(key, value)`` pair per layer of the model, in layer order.

        Returns
        -------
        tuple
            ``(head_prefix, trunk_prefix, tail_prefix)``, each a list with one pair per block of
            that part.
        """
        num_layers = len(self.head.layer_indices) + len(self.trunk.layer_indices)
        num_layers += len(self.tail.layer_indices)
        if len(prefix) != num_layers:
            raise ModelError(
                f"prefix has {len(prefix)} (key, value) pairs; the model has {num_layers} layers, "
                "one pair each."
            )
        pairs = list(prefix)
        parts = (self.head, self.trunk, self.tail)
        head, trunk, tail = ([pairs[i] for i in part.layer_indices] for part in parts)
        return head, trunk, tail


def _layer_types(model: nn.Module, num_layers: int) -> list[str]:
    """Attention kind of each layer, as the model class chooses its 4-D mask."""
    config = model.config
    if isinstance(model, Qwen2ForCausalLM):
        return list(config.layer_types[:num_layers])
    if isinstance(model, MistralForCausalLM) and config.sliding_window is not None:
        return ["sliding_attention"] * num_layers
    return ["full_attention"] * num_layers


def _check_split(head_layers: int, tail_layers: int, num_layers: int) -> None:
    """Raise ModelError unless the trunk keeps at least one block."""
    ok_types = all(
        isinstance(n, int) and not isinstance(n, bool) for n in (head_layers, tail_layers)
    )
    if (
        not ok_types
        or head_layers < 0
        or tail_layers < 1
        or head_layers + tail_layers >= num_layers
    ):
        raise ModelError(
            f"Cannot split a model with {num_layers} layers into head_layers={head_layers!r} and "
            f"tail_layers={tail_layers!r}: they must be integers with head_layers >= 0, "
            f"tail_layers >= 1 and head_layers + tail_layers < {num_layers}, so the trunk keeps at "
            "least one layer."
        )


def split_model(model: nn.Module, head_layers: int, tail_layers: int) -> SplitParts:
    """Slice a causal LM (or a ``PeftModel`` wrapping one) into head, trunk and tail.

    Parameters
    ----------
    model
        A ``LlamaForCausalLM`` (SmolLM2 included), ``Qwen2ForCausalLM``, ``MistralForCausalLM``
        or ``GPT2LMHeadModel``, or a ``peft.PeftModel`` wrapping one (its injected LoRA layers
        end up inside the part that holds their block).
    head_layers
        Number of blocks the head runs after the embeddings (``h >= 0``).
    tail_layers
        Number of blocks the tail runs before the final norm and LM head (``t >= 1``).

    Returns
    -------
    SplitParts
        Views on ``model``: the parts hold the same modules and ``Parameter`` objects, no copies.
        With tied embeddings the head's embedding and the tail's LM head share one weight.

    Raises
    ------
    ModelError
        If the architecture is not supported, or ``h + t`` leaves the trunk without a block.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if isinstance(base, (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)):
        decoder = base.model
        blocks = list(decoder.layers[: base.config.num_hidden_layers])
        _check_split(head_layers, tail_layers, len(blocks))
        types = _layer_types(base, len(blocks))
        cut_a, cut_b = head_layers, len(blocks) - tail_layers

        def part(start: int, stop: int) -> dict[str, Any]:
            return {
                "config": base.config,
                "first_layer": start,
                "blocks": blocks[start:stop],
                "layer_types": types[start:stop],
                "rotary_emb": decoder.rotary_emb,
            }

        return SplitParts(
            head=DecoderHead(embed_tokens=decoder.embed_tokens, **part(0, cut_a)),
            trunk=DecoderTrunk(**part(cut_a, cut_b)),
            tail=DecoderTail(norm=decoder.norm, lm_head=base.lm_head, **part(cut_b, len(blocks))),
        )
    if isinstance(base, GPT2LMHeadModel):
        if base.config.add_cross_attention:
            raise ModelError(
                "Cannot split a GPT2LMHeadModel with add_cross_attention=True; only decoder-only "
                "GPT-2 (add_cross_attention=False) is supported."
            )
        transformer = base.transformer
        blocks = list(transformer.h)
        _check_split(head_layers, tail_layers, len(blocks))
        cut_a, cut_b = head_layers, len(blocks) - tail_layers

        def gpt2_part(start: int, stop: int) -> dict[str, Any]:
            return {"config": base.config, "first_layer": start, "blocks": blocks[start:stop]}

        return SplitParts(
            head=GPT2Head(
                wte=transformer.wte,
                wpe=transformer.wpe,
                drop=transformer.drop,
                **gpt2_part(0, cut_a),
            ),
            trunk=GPT2Trunk(**gpt2_part(cut_a, cut_b)),
            tail=GPT2Tail(
                ln_f=transformer.ln_f, lm_head=base.lm_head, **gpt2_part(cut_b, len(blocks))
            ),
        )
    raise ModelError(
        f"Cannot split a {type(base).__name__}; supported architectures: "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}."
    )
