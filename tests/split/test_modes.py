"""Adapter averaging and the three server modes run through the real silo loop over gRPC + TLS."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from silotune.split.averaging import weighted_average
from silotune.split.keys import load_coordinator_keys
from silotune.split.runner import build_service, run_silo
from silotune.train.trainer import train_centralized
from silotune.transport.grpc_stream import GrpcStreamServer
from silotune.transport.tls import load_tls_material
from tests.split.conftest import run_threads, split_cfg


def test_weighted_average_weights_by_examples():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([5.0, 6.0]), "b": torch.tensor([4.0])}
    out = weighted_average([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([4.0, 5.0]))
    assert torch.allclose(out["b"], torch.tensor([3.0]))
    single = weighted_average([a], [7])
    assert torch.equal(single["w"], a["w"]) and single["w"] is not a["w"]
    with pytest.raises(ValueError, match="different tensors"):
        weighted_average([a, {"w": a["w"]}], [1, 1])
    with pytest.raises(ValueError, match="positive sum"):
        weighted_average([a, b], [0, 0])


def run_split_job(cfg, keys_dir, tls_dir, tmp_path, evaluate_first=False):
    """A coordinator and ``split.silos`` silo threads running the real loop over gRPC + TLS."""
    cfg = cfg.model_copy(deep=True)
    cfg.split.keys_dir, cfg.split.tls_dir = keys_dir, tls_dir
    identity, enrollment = load_coordinator_keys(keys_dir)
    service = build_service(cfg, identity, enrollment)
    server = GrpcStreamServer(service.handle, "127.0.0.1:0", tls=load_tls_material(tls_dir))
    server.start()
    summaries = {}

    def silo(i):
        def run():
            name = f"silo-{i}"
            summaries[name] = run_silo(
                cfg, name, tmp_path / name, target=server.target, shard=i,
                evaluate_splits=evaluate_first and i == 0,
            )  # fmt: skip

        return run

    try:
        errors = run_threads(*(silo(i) for i in range(cfg.split.silos)), timeout=600)
    finally:
        server.stop(0.5)
    assert errors == [None] * cfg.split.silos, errors
    return service, summaries


@pytest.mark.parametrize(
    "mode,trunk_steps", [("sequential", 6), ("client-batching", 3), ("server-hierarchical", 3)]
)
def test_modes_train_and_agree_after_the_final_sync(mode, trunk_steps, keys_dir, tls_dir, tmp_path):
    cfg = split_cfg(train={"max_steps": 3}, silos=2, server_mode=mode, sync_every=2)
    service, summaries = run_split_job(cfg, keys_dir, tls_dir, tmp_path)
    assert service.engine.commits == trunk_steps
    adapters = [
        load_file(tmp_path / f"silo-{i}" / "adapter" / "adapter_model.safetensors")
        for i in range(2)
    ]
    assert adapters[0].keys() == adapters[1].keys()
    for name, tensor in adapters[0].items():  # silo adapters averaged, one trunk adapter
        assert torch.equal(tensor, adapters[1][name]), name
    assert len(adapters[0]) == 6 * 2 * 2  # every layer's q and v LoRA pair: a complete adapter
    for name in ("silo-0", "silo-1"):
        assert summaries[name]["wire_bytes"] > 0
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


@pytest.mark.slow
def test_split_modes_reach_the_centralized_accuracy_band(keys_dir, tls_dir, tmp_path):
    """Fortunes-sample with tiny-llama: every mode within 10 points of centralized accuracy."""
    train = {"max_steps": 40, "batch_size": 8, "lr": 3e-2, "eval_every": 40}
    central_cfg = split_cfg(train=train).model_copy(update={"mode": "centralized"})
    central_cfg.output_dir = tmp_path / "central"
    central = train_centralized(central_cfg, progress=False)["test"]["accuracy"]
    for mode in ("sequential", "client-batching", "server-hierarchical"):
        # Two silos with half the batch each: the same total batch per step.
        cfg = split_cfg(train={**train, "batch_size": 4}, silos=2, server_mode=mode, sync_every=5)
        _, summaries = run_split_job(cfg, keys_dir, tls_dir, tmp_path / mode, evaluate_first=True)
        accuracy = summaries["silo-0"]["test"]["accuracy"]
        assert abs(accuracy - central) <= 0.10, (mode, accuracy, central)
        assert math.isfinite(accuracy)
