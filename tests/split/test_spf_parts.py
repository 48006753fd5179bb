"""SPF + LoRA in split mode: rows per side, averaging, the saved adapter, checkpoints, agreement.

Split == centralized with SPF, step by step, is in tests/split/test_parity.py (SPF cases); the
trunk in the enclave with SPF in tests/split/test_trunk_enclave.py.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from silotune.adapters.peft_adapters import load_adapter
from silotune.adapters.spf import SPF_FILE, select_rows, spf_deltas
from silotune.config import JobConfig, SPFConfig
from silotune.dispatch import run_job
from silotune.errors import ModelError
from silotune.models.loading import load_model
from silotune.split.agreement import shared_settings
from silotune.split.averaging import weighted_average
from silotune.split.engines import Roster, make_engine
from silotune.split.keys import load_enrollment, load_silo_keys
from silotune.split.parts import PartState, build_half, save_full_adapter
from silotune.split.resume import TrunkCheckpoints, restore_silo, restore_trunk, save_silo
from silotune.split.silo import TrunkLink, make_averager
from silotune.split.spf_parts import side_layers, spf_rows_state
from silotune.train.loop import make_optimizer, make_scheduler, train_step
from tests.split.conftest import (
    make_stream,
    open_silo,
    run_threads,
    silo_end,
    split_cfg,
    trunk_server,
)

SPF_DELTA = ".spf.delta"


def spf_split_cfg(**split) -> JobConfig:
    cfg = split_cfg(train={"max_steps": 2}, **split)
    cfg.adapter.spf = SPFConfig(enabled=True)
    return cfg


def _deltas(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith(SPF_DELTA)}


def test_each_side_holds_the_centralized_rows_of_its_own_blocks_only():
    cfg = spf_split_cfg()  # tiny-llama: 6 blocks, head 1, tail 1
    central = select_rows(load_model("tiny-llama", "cpu", "float32").model, cfg.adapter.spf)
    for side, layers in (("silo", [0, 5]), ("trunk", [1, 2, 3, 4])):
        assert side_layers(6, 1, 1, side) == layers
        half = build_half(cfg, side)
        rows = {name: d.rows for name, d in spf_deltas(half.model).items()}
        assert {int(name.split(".")[2]) for name in rows} == set(layers)
        assert len(rows) == 5 * len(layers)  # q, k, v, up, gate per block
        for name, picked in rows.items():
            assert torch.equal(picked, central[name]), name
        # The deltas travel with the part's state, under PEFT-style names, trainable.
        parts = [half.parts.head, half.parts.tail] if side == "silo" else [half.parts.trunk]
        assert len(_deltas(PartState(half.model, parts).get(parts))) == len(rows)


def test_the_saved_adapter_reloads_with_load_adapter_and_gives_the_split_models_logits(
    keys_dir, tmp_path
):
    cfg = spf_split_cfg()
    with trunk_server(cfg, keys_dir) as (_, connect_fn):
        end = silo_end(cfg, open_silo(connect_fn, keys_dir, "silo-0"))
        stream = make_stream(cfg, end.half)
        for step in range(2):
            train_step(
                end.model, stream, step, end.optimizer, end.scheduler, cfg.train,
                torch.device("cpu"), loss_fn=end.model.loss,
            )  # fmt: skip
        ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        end.model.eval()
        with torch.no_grad():
            split_logits = end.model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        trunk = end.link.finish()
    state = {**end.adapter(), **trunk}
    assert any(k.endswith(".spf.rows") for k in trunk)  # the trunk's rows came with its adapter
    out = tmp_path / "adapter"
    save_full_adapter(end.half.model, state, out)
    saved = load_file(out / SPF_FILE)
    assert len(saved) == 2 * 5 * 6  # rows and values of q, k, v, up, gate in all six blocks
    assert all(saved[k].abs().max() > 0 for k in saved if k.endswith(".delta"))  # all trained
    base = load_model("tiny-llama", "cpu", "float32", seed=cfg.train.seed).model
    model = load_adapter(base, out)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, split_logits, atol=1e-5, rtol=0)


def test_an_adapter_whose_trunk_rows_are_missing_or_wrong_is_never_written(keys_dir, tmp_path):
    cfg = spf_split_cfg()
    silo, trunk = build_half(cfg, "silo"), build_half(cfg, "trunk")
    silo_parts = [silo.parts.head, silo.parts.tail]
    state = PartState(silo.model, silo_parts).get(silo_parts)
    state.update(PartState(trunk.model, [trunk.parts.trunk]).get([trunk.parts.trunk]))
    out = tmp_path / "adapter"
    with pytest.raises(ModelError, match="with their rows"):  # the trunk sent no rows
        save_full_adapter(silo.model, state, out)
    rows = spf_rows_state(trunk.model, [trunk.parts.trunk])
    name = next(iter(rows))
    bad = {**rows, name: rows[name].flip(0)}  # not sorted
    with pytest.raises(ModelError, match="not sorted"):
        save_full_adapter(silo.model, {**state, **bad}, out)
    assert not out.exists()
    save_full_adapter(silo.model, {**state, **rows}, out)
    assert (out / SPF_FILE).is_file()


def test_secure_averaging_makes_the_silos_spf_deltas_equal(keys_dir):
    cfg = spf_split_cfg(silos=2)  # secure_averaging masking (the default)
    examples = [100, 300]
    with trunk_server(cfg, keys_dir) as (_, connect_fn):
        silos = []
        for i in range(2):
            name = f"silo-{i}"
            half = build_half(cfg, "silo")
            link = TrunkLink(open_silo(connect_fn, keys_dir, name), timeout=60)
            identity, _ = load_silo_keys(keys_dir, name)
            enrollment = load_enrollment(keys_dir, "test silo")
            averager = make_averager(cfg, link, identity, enrollment, name)
            link.join(examples[i], shared_settings(cfg, half.model))
            parts = [half.parts.head, half.parts.tail]
            silos.append((half, parts, PartState(half.model, parts), averager))
        gen = torch.Generator().manual_seed(0)
        states = []
        for _, parts, names, _ in silos:  # as if each silo had trained on its own data
            state = names.get(parts)
            noise = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
            states.append({k: v + noise[k] for k, v in state.items()})
        first = next(iter(_deltas(states[0])))
        assert not torch.equal(states[0][first], states[1][first])  # they differ before the sync
        results = [None, None]

        def sync(i):
            def run():
                half, parts, names, averager = silos[i]
                names.set(parts, averager.average(2, states[i], examples[i]))
                results[i] = names.get(parts)

            return run

        assert run_threads(sync(0), sync(1)) == [None, None]
    expected = weighted_average(states, examples)
    for key in _deltas(expected):
        torch.testing.assert_close(results[0][key], results[1][key], atol=0, rtol=0)
        torch.testing.assert_close(results[0][key], expected[key], atol=1e-6, rtol=0)


def test_a_silo_checkpoint_restores_its_spf_deltas(tmp_path):
    cfg = spf_split_cfg()
    half = build_half(cfg, "silo")
    optimizer = make_optimizer(half.model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    with torch.no_grad():
        for delta in spf_deltas(half.model).values():
            delta.delta.normal_(std=0.01)
    save_silo(tmp_path, 2, half.model, optimizer, scheduler, cfg, "silo-0")
    fresh = build_half(cfg, "silo")
    optimizer = make_optimizer(fresh.model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    assert restore_silo(tmp_path, fresh.model, optimizer, scheduler, 2) == 2
    saved = spf_deltas(half.model)
    for name, delta in spf_deltas(fresh.model).items():
        assert torch.equal(delta.delta, saved[name].delta), name


def test_a_trunk_checkpoint_restores_its_spf_deltas(tmp_path):
    cfg = spf_split_cfg(server_mode="server-hierarchical")
    engines = []
    for _ in range(2):
        half = build_half(cfg, "trunk")
        trunk = half.parts.trunk
        state = PartState(half.model, [trunk])
        engine = make_engine(
            cfg.split.server_mode, trunk, state, cfg.train, Roster(60), torch.device("cpu"),
            torch.float32,
        )  # fmt: skip
        engines.append((half, engine))
    (saved, engine), (fresh, resumed) = engines
    with torch.no_grad():
        for delta in spf_deltas(saved.model).values():
            delta.delta.normal_(std=0.01)
    saver = TrunkCheckpoints(tmp_path, engine, saved.model, cfg)
    saver.committed("silo-0", cfg.train.max_steps)  # the last step is a sync step
    assert restore_trunk(tmp_path, resumed, fresh.model) == cfg.train.max_steps
    resumed.add("silo-0")  # a replica made after the restore starts from the saved deltas
    want = engine.trunk_state()
    got = resumed.state.get([resumed.replicas["silo-0"].part])
    assert _deltas(want) and _deltas(want).keys() == _deltas(got).keys()
    for key, value in _deltas(want).items():
        assert torch.equal(got[key], value), key


@pytest.mark.slow
def test_train_split_with_spf_saves_one_adapter_both_silos_agree_on(tmp_path):
    cfg = spf_split_cfg(silos=2, sync_every=2)
    cfg.output_dir = tmp_path / "run"
    summary = run_job(cfg, progress=False)
    assert summary["split"]["trunk_steps"] == 2
    folder = cfg.output_dir / "silos"
    silos = [load_file(folder / f"silo-{i}" / "adapter" / SPF_FILE) for i in (0, 1)]
    assert silos[0].keys() == silos[1].keys() and len(silos[0]) == 2 * 5 * 6
    for key in silos[0]:  # averaged at the last step: the same head, tail and trunk deltas
        assert torch.equal(silos[0][key], silos[1][key]), key
    merged = load_file(cfg.output_dir / "adapter" / SPF_FILE)  # the job's adapter is silo 0's
    assert all(torch.equal(merged[key], silos[0][key]) for key in merged)
