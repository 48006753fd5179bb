"""What every attacker knows in advance: the public base model's parts and public text.

Public text is Debian fortunes from categories that no silotune dataset trains on
(:data:`PUBLIC_CATEGORIES`); a text that also occurs in the silo's data is dropped, so an attack
never learns from the silo's own examples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from silotune.config import JobConfig
from silotune.data.fortunes import DEFAULT_ROOT, SAMPLE_CATEGORIES, read_fortunes
from silotune.data.registry import load_splits
from silotune.data.tasks import make_task
from silotune.errors import DataError
from silotune.split.parts import build_half

__all__ = ["PUBLIC_CATEGORIES", "PublicModel", "public_model", "public_texts"]

# Disjoint from fortunes-sample (food, linux, politics, startrek) and from the 6 largest
# categories of `fortunes` (computers, cookie, definitions, miscellaneous, people, politics).
PUBLIC_CATEGORIES = ("literature", "wisdom", "science", "humorists", "work", "love")
assert not set(PUBLIC_CATEGORIES) & set(SAMPLE_CATEGORIES)


@dataclass
class PublicModel:
    """The public base model cut like the silo's: head and tail with untrained adapters."""

    head: torch.nn.Module  # (B, T) ids, (B, T) mask -> (B, T, C)
    tail: torch.nn.Module  # (B, T, C), (B, T) mask -> (B, T, V)
    tokenizer: Any
    task: Any  # the job's task: template and label token ids are part of the public config
    embed: torch.Tensor  # (V, C) input embedding table
    device: torch.device


def public_model(cfg: JobConfig) -> PublicModel:
    """The attacker's copy of the silo's parts, from the public base model (LoRA B = 0: no change)."""
    public = cfg.model_copy(deep=True)
    public.adapter.type = "lora"  # freshly initialised LoRA leaves the base outputs unchanged
    half = build_half(public, "silo")
    for p in half.model.parameters():
        p.requires_grad_(False)
    half.model.eval()
    splits = load_splits(cfg.data, seed=cfg.train.seed)
    tokenizer = half.loaded.tokenizer
    task = make_task(
        tokenizer, cfg.data.task, splits.labels, splits.prompt_template, cfg.data.max_length
    )
    embed = half.model.get_input_embeddings().weight.detach()
    return PublicModel(half.parts.head, half.parts.tail, tokenizer, task, embed, half.loaded.device)


def public_texts(cfg: JobConfig, count: int, seed: int = 0) -> list[str]:
    """``count`` public texts (fortunes of :data:`PUBLIC_CATEGORIES`, none of the silo's texts)."""
    corpus = read_fortunes(DEFAULT_ROOT, max_chars=400)
    missing = [c for c in PUBLIC_CATEGORIES if c not in corpus]
    if missing:
        raise DataError(f"public text categories {missing} are missing under {DEFAULT_ROOT}")
    splits = load_splits(cfg.data, seed=cfg.train.seed)
    private = {ex["text"].strip() for part in (splits.train, splits.validation, splits.test)
               for ex in part}  # fmt: skip
    texts = [t for c in PUBLIC_CATEGORIES for t in corpus[c] if t.strip() not in private]
    random.Random(seed).shuffle(texts)
    return texts[:count]
