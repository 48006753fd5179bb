"""P-tuning v2 prefix adapters in split mode: silo owns head/tail prefix, coordinator the trunk's."""

from __future__ import annotations

import socket

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from silotune.config import JobConfig
from silotune.models.loading import load_model
from silotune.models.slicing import position_ids_from_mask
from silotune.split import runner
from silotune.split.parts import PartState, build_half, save_full_adapter
from silotune.split.prefix import PREFIX_STATE, assemble_prompt_embeddings, prefix_shape
from silotune.train.job import build_job
from silotune.train.loop import (
    make_optimizer,
    make_scheduler,
    train_step,
)
from tests.split.conftest import (
    make_stream,
    open_silo,
    run_threads,
    silo_end,
    split_cfg,
    train_silo,
    trunk_server,
)

TOL = 1e-5
LAYERS = 6  # tiny-llama; head_layers=1 and tail_layers=1 leave the trunk layers 1..4
SILO_LAYERS, TRUNK_LAYERS = (0, LAYERS - 1), tuple(range(1, LAYERS - 1))


def _prefix_cfg(train: dict | None = None, model: str = "tiny-llama", **split: object) -> JobConfig:
    cfg = split_cfg(model, train=train, **split)
    cfg.adapter.type = "prefix"
    cfg.adapter.num_virtual_tokens = 3
    return cfg


def _layers(*indices: int) -> set[str]:
    return {f"{PREFIX_STATE}{i}" for i in indices}


@pytest.mark.parametrize("mode", ["sequential", "client-batching", "server-hierarchical"])
def test_split_prefix_step_equals_centralized_step(mode, keys_dir):
    # grad_accum 2 and a small max_grad_norm: the joint silo + trunk norm decides the clipping.
    train = {"grad_accum": 2, "max_grad_norm": 0.05, "max_steps": 2}
    cfg = _prefix_cfg(train, server_mode=mode, head_layers=1)
    job = build_job(cfg.model_copy(update={"mode": "centralized"}))
    optimizer = make_optimizer(job.model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    initial = job.model.prompt_encoder["default"].embedding.weight.detach().clone()
    with trunk_server(cfg, keys_dir) as (service, connect_fn):
        end = silo_end(cfg, open_silo(connect_fn, keys_dir, "silo-0"))
        for step in range(2):
            want = train_step(  # the foundation trainer's own step: plain PEFT forward
                job.model, job.stream, step, optimizer, scheduler, cfg.train, job.device
            )  # fmt: skip
            got = train_step(
                end.model, job.stream, step, end.optimizer, end.scheduler, cfg.train,
                job.device, loss_fn=end.model.loss,
            )  # fmt: skip
            assert got.loss == pytest.approx(want.loss, abs=TOL)
            assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-5)
            assert want.grad_norm > cfg.train.max_grad_norm  # clipping really happened
        silo_state = end.adapter()
        trunk_state = end.link.finish()
        assert service.engine.commits == 2
    # The silo holds the prefix of its head (layer 0) and tail (layer 5) only; the trunk's
    # layers (1..4) live on the coordinator, which trained them with its own optimizer.
    assert set(silo_state) == _layers(*SILO_LAYERS)
    assert set(trunk_state) == _layers(*TRUNK_LAYERS)
    updated = assemble_prompt_embeddings({**silo_state, **trunk_state}, job.model)
    reference = job.model.prompt_encoder["default"].embedding.weight.detach()
    assert (updated - reference).abs().max().item() <= TOL
    assert (updated - initial).abs().max().item() > 1e-4  # both sides really moved


def test_each_side_holds_only_its_layers_prefix():
    cfg = _prefix_cfg(head_layers=1)
    silo, trunk = build_half(cfg, "silo"), build_half(cfg, "trunk")
    silo_names = PartState(silo.model, [silo.parts.head, silo.parts.tail])
    trunk_names = PartState(trunk.model, [trunk.parts.trunk])
    assert {peft for _, _, peft in silo_names.names} == _layers(*SILO_LAYERS)
    assert {peft for _, _, peft in trunk_names.names} == _layers(*TRUNK_LAYERS)
    silo_trainable = [
        *silo.parts.head.parameters(),
        *silo.parts.tail.parameters(),
        *silo.model.parameters(),
    ]
    tokens, layers, heads, dim = prefix_shape(silo.model)
    assert layers == LAYERS
    # Trainable on the silo: one (P, 2, H_kv, D) tensor per head/tail layer, nothing else.
    shapes = {tuple(p.shape) for p in silo_trainable if p.requires_grad}
    assert shapes == {(tokens, 2, heads, dim)}
    assert sum(p.requires_grad for p in silo_trainable) == 2


@pytest.mark.parametrize("model", ["tiny-llama", "gpt2"])
def test_saved_prefix_adapter_loads_with_plain_peft(model, tmp_path, gpt2_dir):
    name = str(gpt2_dir) if model == "gpt2" else model
    cfg = _prefix_cfg(model=name, head_layers=1)
    silo, trunk = build_half(cfg, "silo"), build_half(cfg, "trunk")
    torch.manual_seed(1)
    with torch.no_grad():  # move every layer's prefix away from its initial values
        for part in (silo.parts.head, silo.parts.tail, trunk.parts.trunk):
            for param in part.prefix_layers.values():
                param.add_(torch.randn_like(param))
    batch = make_stream(cfg, silo).micro_batch(0)
    ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, T) each, right padded
    mask = mask.clone()
    mask[0, :2] = 0  # and one left-padded row
    with torch.no_grad():
        hidden = silo.parts.head(ids, mask)  # (B, T, C)
        hidden = trunk.parts.trunk(hidden, mask)  # (B, T, C)
        split_logits = silo.parts.tail(hidden, mask)  # (B, T, V)
    state = PartState(silo.model, [silo.parts.head, silo.parts.tail]).get(
        [silo.parts.head, silo.parts.tail]
    )
    state.update(PartState(trunk.model, [trunk.parts.trunk]).get([trunk.parts.trunk]))
    save_full_adapter(silo.model, state, tmp_path / "adapter")
    assert set(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == {
        "prompt_embeddings"
    }
    peft = PeftModel.from_pretrained(load_model(name).model, tmp_path / "adapter")
    peft.eval()
    with torch.no_grad():  # plain PEFT; padding-aware positions as `generate` passes them
        logits = peft(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).logits  # (B, T, V)
        right_padded = peft(input_ids=ids[1:], attention_mask=mask[1:]).logits  # no position_ids
    real = mask.bool()
    assert (right_padded[real[1:]] - split_logits[1:][real[1:]]).abs().max().item() <= TOL
    assert (logits[real] - split_logits[real]).abs().max().item() <= TOL
    with torch.no_grad():  # the prefix matters: without it the logits differ
        with peft.disable_adapter():
            plain = peft(input_ids=ids, attention_mask=mask).logits
    assert (plain[real] - split_logits[real]).abs().max().item() > 1e-3


def test_client_batching_with_two_silos_trains_the_prefix(keys_dir):
    cfg = _prefix_cfg({"max_steps": 1}, server_mode="client-batching", silos=2, head_layers=1)
    start = build_half(cfg, "trunk")
    start_state = PartState(start.model, [start.parts.trunk]).get([start.parts.trunk])
    losses: dict[int, list[float]] = {}
    trunks: list[dict[str, torch.Tensor]] = []
    with trunk_server(cfg, keys_dir) as (service, connect_fn):
        ends = [silo_end(cfg, open_silo(connect_fn, keys_dir, f"silo-{i}")) for i in range(2)]
        streams = [make_stream(cfg, ends[i].half, shard=i) for i in range(2)]

        def run(i: int):
            def go() -> None:
                losses[i] = train_silo(ends[i], cfg, streams[i], 1)

            return go

        errors = run_threads(run(0), run(1))
        assert errors == [None, None], errors
        assert service.engine.commits == 1
        trunks.append(service.engine.trunk_state())
    assert all(len(v) == 1 and 0 < v[0] < 20 for v in losses.values())
    (trunk_state,) = trunks
    assert set(trunk_state) == _layers(*TRUNK_LAYERS)
    moved = max((trunk_state[k] - start_state[k]).abs().max().item() for k in trunk_state)
    assert moved > 1e-4


def test_serve_and_join_save_a_complete_prefix_adapter(keys_dir, tls_dir, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    common = {"address": f"127.0.0.1:{port}", "keys_dir": keys_dir, "tls_dir": tls_dir}
    coordinator = _prefix_cfg({"max_steps": 2}, head_layers=1, **common)
    coordinator.output_dir = tmp_path / "coordinator"
    silo = _prefix_cfg({"max_steps": 2}, head_layers=1, **common)
    silo.output_dir = tmp_path / "silo-0"
    results: dict[str, dict] = {}

    def serve() -> None:
        results["coordinator"] = runner.serve(coordinator)

    def join() -> None:
        results["silo"] = runner.join(silo, "silo-0")

    errors = run_threads(serve, join, timeout=300)
    assert errors == [None, None], errors
    assert results["coordinator"]["trunk_steps"] == 2
    trunk = load_file(tmp_path / "coordinator" / "trunk_adapter.safetensors")
    assert set(trunk) == _layers(*TRUNK_LAYERS)  # the coordinator kept only the trunk's prefix
    adapter_dir = tmp_path / "silo-0" / "adapter"
    saved = load_file(adapter_dir / "adapter_model.safetensors")["prompt_embeddings"]
    peft = PeftModel.from_pretrained(load_model("tiny-llama").model, adapter_dir)
    tokens, layers, heads, dim = prefix_shape(peft)
    table = saved.view(tokens, layers, 2, heads, dim)
    for name, tensor in trunk.items():  # the trunk's rows sit at their layers in the full table
        assert torch.equal(table[:, int(name.rsplit(".", 1)[1])], tensor), name
    loaded = peft.prompt_encoder["default"].embedding.weight
    assert torch.equal(loaded.detach(), saved)
