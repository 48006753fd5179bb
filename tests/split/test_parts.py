"""The silo's half of a split model: a lean load never holds the trunk and computes the same."""

from __future__ import annotations

import torch

from silotune.models.loading import export_model, load_model
from silotune.models.slicing import split_model
from silotune.split.parts import build_half
from tests.split.conftest import split_cfg


def test_lean_silo_load_skips_the_trunk_and_matches_the_full_model(tmp_path):
    folder = tmp_path / "tiny"
    export_model("tiny-llama", folder)
    half = build_half(split_cfg(str(folder), head_layers=1, tail_layers=2), "silo")
    blocks = half.model.get_base_model().model.layers
    held = [i for i, block in enumerate(blocks) if any(True for _ in block.parameters())]
    assert held == [0, 4, 5]  # head block 0, tail blocks 4 and 5; the trunk was never loaded
    full = split_model(load_model("tiny-llama").model, 1, 2)
    ids = torch.randint(2, 4000, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad(), half.model.disable_adapter():
        head = half.parts.head(ids, mask)
        assert torch.equal(head, full.head(ids, mask))
        trunk = full.trunk(head, mask)
        assert torch.equal(half.parts.tail(trunk, mask), full.tail(trunk, mask))
    lora = [n for n, p in half.model.named_parameters() if p.requires_grad]
    assert lora and all(".layers.0." in n or ".layers.4." in n or ".layers.5." in n for n in lora)
