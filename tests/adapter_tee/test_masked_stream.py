"""The mask stream: one-time by construction (the counter only moves forward), keyed, Gaussian."""

from __future__ import annotations

import pytest
import torch

from silotune.adapter_tee.masked_stream import BLOCK_BYTES, MASK_LABEL, MaskReuseError, MaskStream
from silotune.crypto.prg import expand_bytes

SEED = bytes(range(32))


def test_keystream_is_the_prg_stream_at_the_asked_block() -> None:
    # Known answer: block k of the mask stream is block k of the PRG's AES-CTR stream for the key.
    reference = expand_bytes(SEED, 10 * BLOCK_BYTES, label=MASK_LABEL)
    stream = MaskStream(SEED)
    assert stream.keystream(0, 3 * BLOCK_BYTES) == reference[: 3 * BLOCK_BYTES]
    assert stream.keystream(5, 2 * BLOCK_BYTES) == reference[5 * BLOCK_BYTES : 7 * BLOCK_BYTES]
    assert stream.next_block == 7


@pytest.mark.parametrize("first_block", [0, 3, 6])
def test_asking_for_used_blocks_raises(first_block: int) -> None:
    stream = MaskStream(SEED)
    stream.keystream(0, 7 * BLOCK_BYTES)
    with pytest.raises(MaskReuseError, match="already used"):
        stream.keystream(first_block, BLOCK_BYTES)
    assert stream.next_block == 7  # a refused request consumes nothing and rewinds nothing


def test_masks_use_disjoint_increasing_block_ranges_and_differ() -> None:
    stream = MaskStream(SEED)
    shapes = [(3,), (4, 5), (4, 5), (1,), (2, 3, 7), (4, 5)]
    masks = [stream.gaussian(shape) for shape in shapes]
    for mask, shape in zip(masks, shapes, strict=True):
        assert mask.z.shape == shape and mask.z.dtype == torch.float64
    ranges = [(m.first_block, m.first_block + m.n_blocks) for m in masks]
    for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert start >= end  # never overlapping, always forward
    same_shape = [m.z for m, s in zip(masks, shapes, strict=True) if s == (4, 5)]
    assert not torch.equal(same_shape[0], same_shape[1])
    assert not torch.equal(same_shape[1], same_shape[2])
    assert stream.masks_drawn == len(shapes)


def test_each_enclave_draws_its_own_key() -> None:
    assert not torch.equal(MaskStream().gaussian((64,)).z, MaskStream().gaussian((64,)).z)
    assert torch.equal(MaskStream(SEED).gaussian((64,)).z, MaskStream(SEED).gaussian((64,)).z)


def test_masks_are_standard_normal() -> None:
    z = MaskStream(SEED).gaussian((200_001,)).z.double()
    assert abs(float(z.mean())) < 0.01
    assert abs(float(z.std()) - 1.0) < 0.01
    # Gaussian tails: P(|z| > 2) = 0.0455, P(|z| > 3) = 0.0027.
    assert abs(float((z.abs() > 2).double().mean()) - 0.0455) < 0.003
    assert abs(float((z.abs() > 3).double().mean()) - 0.0027) < 0.0006
    assert bool(torch.isfinite(z).all())


def test_no_mask_element_is_zero() -> None:
    # The extreme words: u1 closest to 1 gives the smallest radius, u2 near 1/4 a small cosine.
    stream = MaskStream(SEED)
    z = stream.gaussian((400_000,)).z
    assert float(z.abs().min()) > 0
    words = torch.tensor([2**32 - 1, 2**30, 2**31, 0], dtype=torch.float64)
    uniform = (words + 0.5) / 2**32
    radius = torch.sqrt(-2.0 * torch.log(uniform))
    angle = 2 * torch.pi * uniform
    assert float((radius * torch.cos(angle)).abs().min()) > 0
    assert float((radius * torch.sin(angle)).abs().min()) > 0
