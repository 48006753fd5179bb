"""Tests for silotune.adapters.spf: L1 selection, masked-gradient equivalence, save, load, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from silotune.adapters.peft_adapters import attach_adapter, load_adapter, save_adapter
from silotune.adapters.spf import (
    SPF_FILE,
    effective_weight,
    kept_units,
    select_rows,
    spf_deltas,
)
from silotune.config import AdapterConfig, JobConfig, SPFConfig, config_from_dict
from silotune.errors import CheckpointError, ConfigError
from silotune.eval.runner import evaluate_job
from silotune.models.presets import build_tiny_llama
from silotune.train.checkpoint import latest_checkpoint, load_checkpoint
from silotune.train.job import build_job
from silotune.train.loop import forward_loss, make_optimizer, make_scheduler, train_step
from silotune.train.trainer import train_centralized
from tests.conftest import FAST_JOB, build_tiny_arch

SPF_ON = ("adapter.spf.enabled=true",)
PROMPT = torch.tensor([[5, 17, 300, 42, 9, 1000, 77]])


def spf_cfg(head: float = 0.5, ffn: float = 0.5) -> SPFConfig:
    return SPFConfig(enabled=True, head_ratio=head, ffn_ratio=ffn)


def head_rows(heads: list[int], dim: int, offset: int = 0) -> list[int]:
    return sorted(offset + h * dim + i for h in heads for i in range(dim))


def as_ranked(weight: torch.Tensor) -> torch.Tensor:
    """The values SPF ranks: the weight rounded to bfloat16 (see spf._rank), in float64."""
    return weight.detach().to(torch.bfloat16).double()


def top(norms: torch.Tensor, k: int) -> list[int]:
    return torch.topk(norms, k).indices.tolist()


@pytest.mark.parametrize(
    ("ratio", "units", "kept"),
    [(0.5, 9, 5), (0.5, 3, 2), (0.1, 30, 3), (1.0, 3, 3), (0.01, 3, 1), (0.5, 1536, 768)],
)
def test_kept_units_is_the_ceiling_and_at_least_one(ratio: float, units: int, kept: int) -> None:
    assert kept_units(ratio, units) == kept


def test_llama_selection_ranks_heads_per_projection_with_gqa_and_neurons_by_up_rows() -> None:
    model, _ = build_tiny_llama()  # 4 query heads, 2 key/value heads, head dim 32, FFN 352
    rows = select_rows(model, spf_cfg(head=0.5, ffn=0.25))
    assert len(rows) == 6 * 5
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}."
        for proj, heads in (("q_proj", 4), ("k_proj", 2), ("v_proj", 2)):
            weight = as_ranked(getattr(layer.self_attn, proj).weight)  # (heads * 32, 128)
            norms = weight.abs().reshape(heads, 32, -1).sum(dim=(1, 2))
            want = head_rows(top(norms, math.ceil(heads / 2)), 32)
            assert rows[f"{prefix}self_attn.{proj}"].tolist() == want
        up = as_ranked(layer.mlp.up_proj.weight)
        assert rows[f"{prefix}mlp.up_proj"].tolist() == sorted(top(up.abs().sum(dim=1), 88))
        assert torch.equal(rows[f"{prefix}mlp.gate_proj"], rows[f"{prefix}mlp.up_proj"])
    everything = select_rows(model, spf_cfg(head=1.0, ffn=1.0))
    assert everything["model.layers.0.self_attn.k_proj"].tolist() == list(range(64))
    assert everything["model.layers.0.mlp.up_proj"].tolist() == list(range(352))


def test_a_bf16_and_an_fp32_copy_of_a_model_pick_the_same_rows_even_at_near_ties() -> None:
    fp32, _ = build_tiny_llama()
    up = fp32.model.layers[0].mlp.up_proj.weight  # (352, 128)
    with torch.no_grad():
        up.fill_(0.01)
        up[10] = 1.0
        up[20] = 1.0 + 2**-20  # larger in fp32, equal to row 10 once rounded to bf16
    bf16 = build_tiny_llama()[0]
    bf16.load_state_dict(fp32.state_dict())
    bf16.to(torch.bfloat16)
    one = spf_cfg(ffn=1 / 352)  # keep a single neuron
    name = "model.layers.0.mlp.up_proj"
    assert select_rows(fp32, one)[name].tolist() == select_rows(bf16, one)[name].tolist() == [10]
    picked_fp32, picked_bf16 = select_rows(fp32, spf_cfg()), select_rows(bf16, spf_cfg())
    assert all(torch.equal(picked_fp32[n], picked_bf16[n]) for n in picked_fp32)


def test_gpt2_fused_qkv_ranks_q_k_and_v_heads_separately() -> None:
    model = build_tiny_arch("gpt2", 300)  # hidden 64, 4 heads of 16, c_attn (64, 192)
    rows = select_rows(model, spf_cfg(head=0.5, ffn=0.5))
    assert sorted(rows) == sorted(
        f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")
    )
    for i, block in enumerate(model.transformer.h):
        out_rows = as_ranked(block.attn.c_attn.weight).t()  # Conv1D keeps (in, out)
        want = []
        for part in range(3):  # Q, K, V: 2 of 4 heads each
            norms = out_rows[part * 64 : (part + 1) * 64].abs().reshape(4, 16, -1).sum(dim=(1, 2))
            want += head_rows(top(norms, 2), 16, offset=part * 64)
        assert rows[f"transformer.h.{i}.attn.c_attn"].tolist() == sorted(want)
        fc = as_ranked(block.mlp.c_fc.weight).t()  # (256, 64)
        assert rows[f"transformer.h.{i}.mlp.c_fc"].tolist() == sorted(top(fc.abs().sum(1), 128))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hooked_deltas_equal_a_forward_with_the_rows_replaced(arch: str) -> None:
    base = build_tiny_arch(arch, 300)
    model = attach_adapter(build_tiny_arch(arch, 300), AdapterConfig(r=2, spf=spf_cfg()))
    gen = torch.Generator().manual_seed(1)
    for delta in spf_deltas(model).values():
        delta.delta.data = torch.randn(delta.delta.shape, generator=gen) * 0.05
    with torch.no_grad():
        for name in spf_deltas(model):
            layer = base.get_submodule(name)
            merged = effective_weight(model.get_base_model().get_submodule(name))  # (out, in)
            layer.weight.copy_(merged.t() if arch == "gpt2" else merged)
        ids = PROMPT % 300
        hooked, merged_logits = model(input_ids=ids).logits, base(input_ids=ids).logits
    assert torch.allclose(hooked, merged_logits, atol=1e-5)
    assert not torch.allclose(hooked, build_tiny_arch(arch, 300)(input_ids=ids).logits, atol=1e-3)


def test_unsupported_architecture_and_modes_are_config_errors() -> None:
    model, _ = build_tiny_llama()
    model.config.model_type = "falcon"
    with pytest.raises(ConfigError, match="supports model types llama, qwen2, mistral, gpt2"):
        attach_adapter(model, AdapterConfig(r=2, spf=spf_cfg()))
    with pytest.raises(ConfigError, match="adapter.type to lora"):
        config_from_dict({}, ["adapter.type=prefix", *SPF_ON])
    # Split mode trains SPF too (each side the rows of its own blocks: tests/split/test_spf_parts.py).
    assert config_from_dict({}, ["mode=split", *SPF_ON]).adapter.spf.enabled


def test_lora_defaults_to_the_projections_spf_leaves_and_explicit_targets_win() -> None:
    model = attach_adapter(build_tiny_llama()[0], AdapterConfig(r=2, spf=spf_cfg()))
    assert set(model.peft_config["default"].target_modules) == {"o_proj", "down_proj"}
    both = AdapterConfig(r=2, target_modules=["q_proj"], spf=spf_cfg())
    overlap = attach_adapter(build_tiny_llama()[0], both)  # LoRA and SPF on q_proj: they add
    assert set(overlap.peft_config["default"].target_modules) == {"q_proj"}
    assert "model.layers.0.self_attn.q_proj" in spf_deltas(overlap)


def test_spf_lr_puts_the_deltas_in_their_own_scheduled_adamw_group(make_job) -> None:
    cfg = make_job(*SPF_ON, "adapter.spf.lr=1e-4", "train.lr=1e-3", "train.warmup_steps=1")
    job = build_job(cfg)
    optimizer = make_optimizer(job.model, cfg.train)
    lora, spf = optimizer.param_groups
    assert {id(p) for p in spf["params"]} == {id(d.delta) for d in spf_deltas(job.model).values()}
    assert len(lora["params"]) == 2 * 2 * 6  # A and B of o_proj and down_proj in 6 blocks
    scheduler = make_scheduler(optimizer, cfg.train)  # warm-up: half of each peak at step 0
    assert (lora["lr"], spf["lr"]) == pytest.approx((5e-4, 5e-5))
    train_step(job.model, job.stream, 0, optimizer, scheduler, cfg.train, job.device)
    assert (lora["lr"], spf["lr"]) == pytest.approx((1e-3, 1e-4))
    default = make_optimizer(build_job(make_job(*SPF_ON)).model, cfg.train)
    assert len(default.param_groups) == 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[JobConfig, PeftModel, list[float]]:
    """8 SPF + LoRA steps with weight decay; the losses on one fixed batch before and after."""
    out = tmp_path_factory.mktemp("spf") / "run"
    cfg = config_from_dict(
        {**FAST_JOB, "output_dir": str(out)}, [*SPF_ON, "train.weight_decay=0.1", "train.lr=3e-3"]
    )
    job = build_job(cfg)
    optimizer = make_optimizer(job.model, cfg.train)
    probe = job.stream.micro_batch(0)
    with torch.no_grad():
        before = float(forward_loss(job.model, probe))
    for step in range(8):
        train_step(job.model, job.stream, step, optimizer, None, cfg.train, job.device)
    job.model.eval()
    with torch.no_grad():
        after = float(forward_loss(job.model, probe))
    return cfg, job.model, [before, after]


def test_spf_lora_trains_and_the_loss_goes_down(trained) -> None:
    _, model, (before, after) = trained
    assert after < before - 0.05


def test_unselected_rows_and_every_base_weight_stay_exactly_as_loaded(trained) -> None:
    _, model, _ = trained
    fresh = dict(build_tiny_llama()[0].named_parameters())
    base = model.get_base_model()
    for name, param in base.named_parameters():
        if "lora_" in name or name.endswith("spf.delta"):
            continue
        assert torch.equal(param, fresh[name.replace(".base_layer", "")]), name
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    for name, delta in spf_deltas(model).items():
        layer = base.get_submodule(name)
        unselected = torch.ones(layer.out_features, dtype=torch.bool)
        unselected[delta.rows] = False
        with torch.no_grad():
            out = layer(x)  # through the hook
            frozen = torch.nn.functional.linear(x, fresh[f"{name}.weight"])
        assert torch.equal(out[:, unselected], frozen[:, unselected]), name
        assert not torch.allclose(out[:, ~unselected], frozen[:, ~unselected]), name
        assert bool((delta.delta.detach().abs().sum(dim=1) > 0).all()), name  # every row trained


def test_save_and_load_round_trip_gives_identical_logits(trained, tmp_path: Path) -> None:
    cfg, model, _ = trained
    save_adapter(model, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        SPF_FILE,
    }
    saved = load_file(tmp_path / "adapter" / SPF_FILE)
    assert saved["model.layers.2.self_attn.k_proj.rows"].shape == (32,)
    assert saved["model.layers.2.self_attn.k_proj.delta"].shape == (32, 128)
    with torch.no_grad():
        want = model(input_ids=PROMPT).logits
        loaded = load_adapter(build_tiny_llama()[0], tmp_path / "adapter")
        assert torch.equal(loaded(input_ids=PROMPT).logits, want)
        assert not any(p.requires_grad for p in loaded.parameters())
        # plain PEFT reads only the LoRA part (documented in docs/spf.md)
        lora_only = PeftModel.from_pretrained(build_tiny_llama()[0], tmp_path / "adapter")
        assert not torch.allclose(lora_only(input_ids=PROMPT).logits, want, atol=1e-4)


def test_bad_spf_files_are_one_clear_checkpoint_error(trained, tmp_path: Path) -> None:
    _, model, _ = trained
    folder = tmp_path / "adapter"
    save_adapter(model, folder)
    tensors = load_file(folder / SPF_FILE)
    name = "model.layers.0.mlp.up_proj"
    tensors[f"{name}.rows"] = tensors[f"{name}.rows"] + 200  # past the 352 neurons
    save_file(tensors, folder / SPF_FILE, metadata={"format": "silotune-spf", "version": "1"})
    with pytest.raises(CheckpointError, match="do not fit model.layers.0.mlp.up_proj"):
        load_adapter(build_tiny_llama()[0], folder)
    tensors[f"{name}.rows"] = tensors[f"{name}.rows"].flip(0) - 200  # unsorted, negative
    save_file(tensors, folder / SPF_FILE, metadata={"format": "silotune-spf", "version": "1"})
    with pytest.raises(CheckpointError, match="not sorted, distinct, non-negative"):
        load_adapter(build_tiny_llama()[0], folder)
    (folder / SPF_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="corrupt or not safetensors"):
        load_adapter(build_tiny_llama()[0], folder)


class Interrupt(Exception):
    """Stands in for a crash in the middle of a run."""


def stop_at(step: int):
    def hook(done: int, scores: dict[str, float]) -> None:
        if done == step:
            raise Interrupt

    return hook


def test_train_resume_and_eval_carry_the_spf_deltas(make_job, tmp_path: Path) -> None:
    extra = (*SPF_ON, "train.weight_decay=0.1", "train.max_steps=4", "train.eval_every=2")
    full = make_job(*extra, output_dir=tmp_path / "full")
    summary = train_centralized(full, progress=False)
    cut = make_job(*extra, output_dir=tmp_path / "cut")
    with pytest.raises(Interrupt):  # stops in step 4's evaluation: resume from step 2
        train_centralized(cut, progress=False, on_eval=stop_at(4))
    assert (latest_checkpoint(tmp_path / "cut") / SPF_FILE).is_file()
    train_centralized(cut, resume=True, progress=False)
    for file in ("adapter_model.safetensors", SPF_FILE):
        a = load_file(tmp_path / "full" / "adapter" / file)
        b = load_file(tmp_path / "cut" / "adapter" / file)
        assert a.keys() == b.keys()
        assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-6
    # `silotune eval` on the saved folder applies LoRA and SPF: the run's own test scores
    scores = evaluate_job(full, tmp_path / "full" / "adapter", "test", progress=False)
    assert scores == pytest.approx(summary["test"])
    # a job with other ratios selects other rows: its checkpoint does not load into it
    other = build_job(make_job(*extra, "adapter.spf.ffn_ratio=0.25", output_dir=tmp_path / "o"))
    optimizer = make_optimizer(other.model, other.config.train)
    with pytest.raises(CheckpointError, match="differ from this job's selection"):
        load_checkpoint(latest_checkpoint(tmp_path / "full"), other.model, optimizer, None)
