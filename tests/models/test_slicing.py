"""Tests for silotune.models.slicing: parts reproduce the full model and train across a boundary."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from silotune.errors import ModelError
from silotune.models.slicing import SplitParts, position_ids_from_mask, split_model

NUM_LAYERS = 5
VOCAB = 500
TOL = 1e-5

_DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, as in SmolLM2 / Qwen2 / Mistral
    vocab_size=VOCAB,
    max_position_embeddings=64,
)

# Sliding windows (4) shorter than the batch (10 tokens) so the per-layer mask kind matters.
ARCHS: dict[str, Callable[[], nn.Module]] = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_DECODER, tie_word_embeddings=True)),
    "qwen2": lambda: Qwen2ForCausalLM(
        Qwen2Config(**_DECODER, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    ),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_DECODER, sliding_window=4)),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(
            n_embd=64,
            n_layer=NUM_LAYERS,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
    ),
}
LORA_TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc"],
}
SPLITS = [(0, 1), (1, 2), (2, 2), (0, 4), (3, 1)]
LORA_SPLITS = [(0, 1), (1, 2), (2, 2)]  # h = 0: the head has nothing to train


def make_model(arch: str) -> nn.Module:
    """A tiny fp32 model of ``arch`` with fixed weights, in eval mode."""
    torch.manual_seed(0)
    return ARCHS[arch]().float().eval()


def make_lora_model(arch: str) -> nn.Module:
    """``make_model`` with LoRA injected; lora_B is random so the adapters change the output."""
    model = make_model(arch)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=LORA_TARGETS[arch],
        init_lora_weights=False,
        fan_in_fan_out=arch == "gpt2",  # GPT-2 uses Conv1D (weights stored transposed)
    )
    torch.manual_seed(1)
    return get_peft_model(model, config).eval()


def make_batch(padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids (3, 10)`` and ``attention_mask (3, 10)`` with rows of 10, 7 and 4 real tokens."""
    torch.manual_seed(2)
    input_ids = torch.randint(1, VOCAB, (3, 10))
    attention_mask = torch.zeros(3, 10, dtype=torch.long)
    for row, length in enumerate((10, 7, 4)):
        if padding == "right":
            attention_mask[row, :length] = 1
        else:
            attention_mask[row, 10 - length :] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)  # pad id 0
    return input_ids, attention_mask


def reference_logits(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, **kw):
    """The full model called with the position-id convention every part uses."""
    position_ids = position_ids_from_mask(mask)
    return model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **kw).logits


def composed_logits(parts: SplitParts, input_ids, mask, prefixes=(None, None, None)):
    """head -> trunk -> tail with nothing but hidden states and the 2-D mask in between."""
    head_prefix, trunk_prefix, tail_prefix = prefixes
    hidden = parts.head(input_ids, mask, head_prefix)  # (B, T, C)
    hidden = parts.trunk(hidden, mask, trunk_prefix)  # (B, T, C)
    return parts.tail(hidden, mask, tail_prefix)  # (B, T, V)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over real tokens; padding predicts nothing."""
    labels = input_ids.masked_fill(mask == 0, -100)[:, 1:]  # (B, T - 1)
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def split_backward(parts: SplitParts, input_ids, mask, prefixes=(None, None, None)) -> dict:
    """One split-learning training step's forward and backward, as three parties run it.

    Every tensor that crosses a party boundary is cut from the graph with
    ``detach().requires_grad_()``, as a network frame would cut it; its gradient is sent back
    and fed into the sender's backward with ``tensor.backward(grad)``.

    Returns the tensors that crossed the wire, so tests can check what a protocol carries.
    """
    head_prefix, trunk_prefix, tail_prefix = prefixes
    # silo: head forward, send hidden states + mask
    head_out = parts.head(input_ids, mask, head_prefix)  # (B, T, C)
    trunk_in = head_out.detach().requires_grad_()
    # coordinator: trunk forward, send hidden states back
    trunk_out = parts.trunk(trunk_in, mask, trunk_prefix)  # (B, T, C)
    tail_in = trunk_out.detach().requires_grad_()
    # silo: tail forward, loss, backward to the boundary, send its gradient
    logits = parts.tail(tail_in, mask, tail_prefix)  # (B, T, V)
    loss = lm_loss(logits, input_ids, mask)
    loss.backward()
    # coordinator: trunk backward from the silo's gradient, send the input gradient
    trunk_out.backward(tail_in.grad)
    # silo: head backward (a head of embeddings only may have nothing to train)
    if head_out.requires_grad:
        head_out.backward(trunk_in.grad)
    return {
        "forward": [trunk_in, tail_in],
        "backward": [tail_in.grad, trunk_in.grad],
        "loss": loss.detach(),
    }


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradient of every trainable parameter, by name; cleared on the model afterwards."""
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name} received no gradient"
            grads[name] = param.grad.detach().clone()
            param.grad = None
    return grads


def assert_grads_close(actual: dict, expected: dict) -> None:
    """Same parameters, each gradient within TOL, and none of them all zero."""
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        assert grad.abs().max() > 0, f"{name} has a zero gradient; the test would not see a bug"
        diff = (actual[name] - grad).abs().max().item()
        assert diff <= TOL, f"{name}: max abs gradient diff {diff}"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference; fails if either side has NaNs or infinities."""
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a - b).abs().max().item()


def parameter_ptrs(module: nn.Module) -> set[int]:
    """Storage addresses of a module's parameters."""
    return {p.data_ptr() for p in module.parameters()}


# ----------------------------------------------------------------------------- positions


def test_position_ids_from_mask_counts_real_tokens_only():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 1, 2, 1, 1], [1, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
    assert torch.equal(position_ids_from_mask(mask), expected)
    assert torch.equal(position_ids_from_mask(mask.bool()), expected)


# ----------------------------------------------------------------------------- forward parity


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_composed_parts_reproduce_full_model(arch, padding):
    model = make_model(arch)
    input_ids, mask = make_batch(padding)
    with torch.no_grad():
        expected = reference_logits(model, input_ids, mask)
        for head_layers, tail_layers in SPLITS:
            parts = split_model(model, head_layers, tail_layers)
            hidden = parts.head(input_ids, mask)
            assert hidden.shape == (3, 10, 64)
            hidden = parts.trunk(hidden, mask)
            assert hidden.shape == (3, 10, 64)
            logits = parts.tail(hidden, mask)
            assert logits.shape == (3, 10, VOCAB)
            assert max_diff(logits, expected) <= TOL, (head_layers, tail_layers)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_right_padding_matches_a_plain_call_at_real_tokens(arch):
    """With right padding the convention equals HF's default arange(T) positions."""
    model = make_model(arch)
    input_ids, mask = make_batch("right")
    parts = split_model(model, 1, 1)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask).logits
        logits = composed_logits(parts, input_ids, mask)
    real = mask.bool()
    assert max_diff(logits[real], expected[real]) <= TOL


@pytest.mark.parametrize("arch", list(ARCHS))
def test_left_padding_gives_the_unpadded_logits(arch):
    model = make_model(arch)
    input_ids, mask = make_batch("left")
    parts = split_model(model, 2, 1)
    with torch.no_grad():
        padded = composed_logits(parts, input_ids, mask)
        alone = composed_logits(parts, input_ids[2:, 6:], mask[2:, 6:])  # row 2: 4 real tokens
    assert max_diff(padded[2, 6:], alone[0]) <= TOL


@pytest.mark.parametrize("arch", list(ARCHS))
def test_trunk_serves_concatenated_client_batches(arch):
    """Client-batching: one trunk pass over two silos' rows equals two separate passes."""
    model = make_model(arch)
    parts = split_model(model, 1, 1)
    ids_a, mask_a = make_batch("right")
    ids_b, mask_b = make_batch("left")
    with torch.no_grad():
        hidden_a = parts.head(ids_a, mask_a)
        hidden_b = parts.head(ids_b, mask_b)
        together = parts.trunk(torch.cat([hidden_a, hidden_b]), torch.cat([mask_a, mask_b]))
        alone_a = parts.trunk(hidden_a, mask_a)
        alone_b = parts.trunk(hidden_b, mask_b)
    assert max_diff(together, torch.cat([alone_a, alone_b])) <= TOL


# ----------------------------------------------------------------------------- parameter sharing


@pytest.mark.parametrize("arch", list(ARCHS))
def test_parts_share_the_models_parameters(arch):
    model = make_model(arch)
    parts = split_model(model, 1, 2)
    model_ptrs = parameter_ptrs(model)
    head, trunk, tail = (parameter_ptrs(p) for p in (parts.head, parts.trunk, parts.tail))
    assert head | trunk | tail == model_ptrs
    assert not trunk & (head | tail)
    # Only tied embeddings (head's embedding = tail's LM head) may sit in both silo parts.
    assert len(head & tail) == (1 if model.config.tie_word_embeddings else 0)
    blocks = model.model.layers if arch != "gpt2" else model.transformer.h
    assert list(parts.trunk.blocks.values()) == [blocks[1], blocks[2]]
    assert parts.tail.layer_indices == (3, 4)
    model_params = {id(p) for p in model.parameters()}
    for part in (parts.head, parts.trunk, parts.tail):  # the Parameter objects, not equal copies
        assert {id(p) for p in part.parameters()} <= model_params


@pytest.mark.parametrize("arch", list(ARCHS))
def test_part_state_dict_keys_follow_the_model_keys(arch):
    model = make_model(arch)
    parts = split_model(model, 1, 2)
    prefix = "transformer." if arch == "gpt2" else "model."
    model_state = model.state_dict()
    for key, tensor in parts.trunk.state_dict().items():
        assert torch.equal(model_state[prefix + key], tensor), key


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lora_layers_end_up_in_their_parts(arch):
    peft_model = make_lora_model(arch)
    parts = split_model(peft_model, 1, 2)
    lora = {p.data_ptr() for n, p in peft_model.named_parameters() if "lora_" in n}
    trainable = {id(p) for p in peft_model.parameters() if p.requires_grad}
    per_part = [
        {p.data_ptr() for n, p in part.named_parameters() if "lora_" in n}
        for part in (parts.head, parts.trunk, parts.tail)
    ]
    per_block = len(LORA_TARGETS[arch]) * 2  # lora_A and lora_B per target
    assert [len(s) for s in per_part] == [per_block * 1, per_block * 2, per_block * 2]
    assert per_part[0] | per_part[1] | per_part[2] == lora
    for part in (parts.head, parts.trunk, parts.tail):
        assert {id(p) for p in part.parameters() if p.requires_grad} <= trainable


# ----------------------------------------------------------------------------- LoRA training


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_lora_logits_and_gradients_match_full_model(arch, padding):
    peft_model = make_lora_model(arch)
    input_ids, mask = make_batch(padding)

    expected = reference_logits(peft_model, input_ids, mask)
    lm_loss(expected, input_ids, mask).backward()
    expected_grads = trainable_grads(peft_model)
    with torch.no_grad(), peft_model.disable_adapter():
        without_lora = reference_logits(peft_model, input_ids, mask)
    assert max_diff(without_lora, expected.detach()) > 1e-3  # the adapters are really in play

    for head_layers, tail_layers in LORA_SPLITS:
        parts = split_model(peft_model, head_layers, tail_layers)
        logits = composed_logits(parts, input_ids, mask)
        assert max_diff(logits, expected.detach()) <= TOL, (head_layers, tail_layers)
        lm_loss(logits, input_ids, mask).backward()
        assert_grads_close(trainable_grads(peft_model), expected_grads)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_gradients_across_network_boundaries_equal_end_to_end(arch):
    peft_model = make_lora_model(arch)
    input_ids, mask = make_batch("right")

    expected_loss = lm_loss(reference_logits(peft_model, input_ids, mask), input_ids, mask)
    expected_loss.backward()
    expected_grads = trainable_grads(peft_model)

    for head_layers, tail_layers in LORA_SPLITS:
        parts = split_model(peft_model, head_layers, tail_layers)
        wire = split_backward(parts, input_ids, mask)
        assert abs(wire["loss"].item() - expected_loss.item()) <= TOL, (head_layers, tail_layers)
        assert_grads_close(trainable_grads(peft_model), expected_grads)
        for tensor in wire["forward"] + wire["backward"]:
            assert tensor.shape == (3, 10, 64)  # only (B, T, C) activations and gradients travel


# ----------------------------------------------------------------------------- prefix (P-tuning v2)


def make_prefix(model: nn.Module, batch: int, length: int) -> list[tuple[torch.Tensor, ...]]:
    """A random per-layer prefix ``(B, H_kv, P, D)`` that requires grad."""
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(3)
    shape = (batch, kv_heads, length, head_dim)
    return [
        (torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True))
        for _ in range(config.num_hidden_layers)
    ]


def prefix_reference_logits(model, input_ids, mask, prefix):
    """The full model with the prefix in a DynamicCache, as PEFT's prefix tuning passes it."""
    prefix_mask = torch.ones(mask.shape[0], prefix[0][0].shape[-2], dtype=mask.dtype)
    return model(
        input_ids=input_ids,
        attention_mask=torch.cat([prefix_mask, mask], dim=1),  # (B, P + T)
        position_ids=position_ids_from_mask(mask),
        past_key_values=DynamicCache(prefix),
    ).logits


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_prefix_parts_match_full_model_and_its_gradients(arch, padding):
    model = make_model(arch).requires_grad_(False)
    input_ids, mask = make_batch(padding)
    prefix = make_prefix(model, batch=3, length=2)
    parts = split_model(model, 1, 2)

    expected = prefix_reference_logits(model, input_ids, mask, prefix)
    lm_loss(expected, input_ids, mask).backward()
    expected_grads = {
        f"{i}.{j}": t.grad.clone() for i, kv in enumerate(prefix) for j, t in enumerate(kv)
    }
    for kv in prefix:
        for tensor in kv:
            tensor.grad = None

    split_backward(parts, input_ids, mask, parts.split_prefix(prefix))
    grads = {f"{i}.{j}": t.grad for i, kv in enumerate(prefix) for j, t in enumerate(kv)}
    assert_grads_close(grads, expected_grads)

    with torch.no_grad():
        logits = composed_logits(parts, input_ids, mask, parts.split_prefix(prefix))
        without_prefix = composed_logits(parts, input_ids, mask)
    assert max_diff(logits, expected.detach()) <= TOL
    assert max_diff(logits, without_prefix) > 1e-3  # the prefix is really attended to


def test_prefix_with_wrong_layer_count_is_rejected():
    model = make_model("llama")
    input_ids, mask = make_batch("right")
    prefix = make_prefix(model, batch=3, length=2)
    parts = split_model(model, 1, 2)
    with pytest.raises(ModelError, match="this part has 2 blocks"):
        parts.trunk(parts.head(input_ids, mask), mask, prefix[:1])
    with pytest.raises(ModelError, match="the model has 5 layers"):
        parts.split_prefix(prefix[:4])
    with pytest.raises(ModelError, match=r"must be \(B=3"):
        parts.trunk(parts.head(input_ids, mask), mask, [(k[:2], v[:2]) for k, v in prefix[1:3]])


def test_prefix_under_gradient_checkpointing_is_rejected_not_dropped():
    model = make_model("mistral")
    model.gradient_checkpointing_enable()
    input_ids, mask = make_batch("right")
    prefix = make_prefix(model, batch=3, length=2)
    parts = split_model(model, 1, 2)
    head_prefix, trunk_prefix, _ = parts.split_prefix(prefix)
    hidden = parts.head(input_ids, mask, head_prefix)  # eval mode: no checkpointing, prefix used
    parts.trunk.train()
    with pytest.raises(ModelError, match="gradient checkpointing"):
        parts.trunk(hidden, mask, trunk_prefix)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "head_layers,tail_layers", [(-1, 1), (0, 0), (2, 3), (0, 5), (4, 1), (1.0, 1), (True, 1)]
)
def test_bad_split_names_the_values_and_layer_count(head_layers, tail_layers):
    model = make_model("llama")
    with pytest.raises(ModelError) as info:
        split_model(model, head_layers, tail_layers)
    message = str(info.value)
    assert "5 layers" in message
    assert f"head_layers={head_layers!r}" in message and f"tail_layers={tail_layers!r}" in message


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(ModelError) as info:
        split_model(nn.Sequential(nn.Linear(4, 4)), 1, 1)
    message = str(info.value)
    assert "Sequential" in message
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "GPT2LMHeadModel"):
        assert name in message


def test_gpt2_with_cross_attention_is_rejected():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=2, add_cross_attention=True))
    with pytest.raises(ModelError, match="add_cross_attention"):
        split_model(model, 1, 1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mismatched_mask_or_hidden_size_is_rejected(arch):
    model = make_model(arch)
    input_ids, mask = make_batch("right")
    parts = split_model(model, 1, 1)
    hidden = parts.head(input_ids, mask)
    with pytest.raises(ModelError, match="attention_mask has shape"):
        parts.head(input_ids, mask[:, :-1])
    with pytest.raises(ModelError, match="attention_mask has shape"):
        parts.trunk(hidden, mask[:2])
    with pytest.raises(ModelError, match=r"must be \(B, T, 64\)"):
        parts.tail(hidden[..., :32], mask)
