"""Federated SPF + LoRA: the SPF rows travel as extra entries of the flat update, nothing more."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from safetensors.numpy import load_file

from silotune.adapters.peft_adapters import save_adapter
from silotune.adapters.spf import SPF_FILE, select_rows
from silotune.config import JobConfig, SPFConfig, config_from_dict
from silotune.crypto import he
from silotune.crypto.fixedpoint import FixedPointCodec
from silotune.eval.runner import evaluate_job
from silotune.federated import silo
from silotune.federated.vectors import FederationError, flatten, load_flat
from silotune.models.presets import build_tiny_llama
from silotune.train.job import build_job
from tests.federated.harness import run_in_process

CLIP = 0.25


def make_cfg(tmp_path: Path, name: str, spf: bool = True, **federation: object) -> JobConfig:
    fed = {"silos": 2, "rounds": 1, "local_steps": 2, "min_silos": 2, "secagg_clip": CLIP}
    fed.update(federation)
    adapter = {"r": 4, "spf": {"enabled": spf}, "target_modules": ["o_proj", "down_proj"]}
    return config_from_dict(
        {
            "mode": "federated",
            "model": "tiny-llama",
            "adapter": adapter,
            "data": {"dataset": "fortunes-sample", "max_length": 32, "max_eval_examples": 4},
            "train": {"batch_size": 4, "lr": 1e-3, "eval_batch_size": 16, "seed": 0},
            "output_dir": str(tmp_path / name),
            "federation": fed,
        }
    )


def read_adapter(folder: Path) -> np.ndarray:
    """A saved adapter's LoRA and SPF values (not the row indices) in a fixed order."""
    tensors = {**load_file(folder / "adapter_model.safetensors"), **load_file(folder / SPF_FILE)}
    return np.concatenate([tensors[k].reshape(-1) for k in sorted(tensors) if "rows" not in k])


def expected_fedavg(cfg: JobConfig) -> np.ndarray:
    """The global adapter after one round, computed from each silo's local round directly."""
    job = build_job(cfg)
    global_vec = flatten(job.model)
    results = [silo.local_round(cfg, p, global_vec, 1, None, None)[0] for p in (0, 1)]
    total = sum(r.examples * r.values.astype(np.float64) for r in results)
    mean = total / sum(r.examples for r in results)
    load_flat(job.model, (global_vec + mean).astype(np.float32))
    out = cfg.output_dir.parent / f"expected-{cfg.output_dir.name}"
    save_adapter(job.model, out)
    return read_adapter(out)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[JobConfig, dict]:
    """Two silos, two rounds of SPF + LoRA with plain aggregation."""
    cfg = make_cfg(tmp_path_factory.mktemp("spf-fed"), "plain", rounds=2)
    summary, _, _ = run_in_process(cfg)
    return cfg, summary


def test_upload_grows_by_exactly_the_selected_rows(plain) -> None:
    cfg, summary = plain
    lora_only = flatten(build_job(make_cfg(cfg.output_dir.parent, "lora", spf=False)).model).size
    model = build_tiny_llama()[0]
    rows = select_rows(model, SPFConfig(enabled=True))
    selected = sum(r.numel() * model.get_submodule(n).in_features for n, r in rows.items())
    full = sum(model.get_submodule(n).weight.numel() for n in rows)
    # 6 layers x (64 q + 32 k + 32 v + 176 up + 176 gate rows) x 128 inputs
    assert selected == 6 * 480 * 128 == full // 2
    assert summary["upload_bytes_per_silo_per_round"] == 4 * (lora_only + selected)


def test_federated_spf_trains_and_its_adapter_evaluates(plain) -> None:
    cfg, summary = plain
    spf = load_file(cfg.output_dir / "adapter" / SPF_FILE)
    deltas = [v for k, v in spf.items() if k.endswith(".delta")]
    assert len(deltas) == 30 and all(np.abs(d).sum(axis=1).min() > 0 for d in deltas)
    assert (cfg.output_dir / "checkpoints" / "step-00000002" / SPF_FILE).is_file()
    scores = evaluate_job(cfg, cfg.output_dir / "adapter", "test", progress=False)
    assert scores == pytest.approx(summary["test"])


def test_restarted_coordinator_resumes_lora_and_spf_from_the_last_round(plain) -> None:
    full, _ = plain
    crash = make_cfg(full.output_dir.parent, "crash", rounds=2)

    def crash_in_round_2(message: Message, context: Context, call_next):
        if message.metadata.group_id == "2":
            raise ConnectionError("coordinator network down")
        return call_next(message, context)

    with pytest.raises(FederationError, match="round 2 failed"):
        run_in_process(crash, mods=[crash_in_round_2])
    assert (crash.output_dir / "checkpoints" / "step-00000001" / SPF_FILE).is_file()
    run_in_process(crash, resume=True)
    got, want = (
        read_adapter(crash.output_dir / "adapter"),
        read_adapter(full.output_dir / "adapter"),
    )
    assert np.abs(got - want).max() < 1e-6


@pytest.mark.parametrize("mode", ["none", "masking", "he"])
def test_one_round_is_the_weighted_mean_of_the_silos_lora_and_spf_updates(
    tmp_path: Path, mode: str
) -> None:
    cfg = make_cfg(tmp_path, mode, secure_aggregation=mode)
    run_in_process(cfg)
    got, want = read_adapter(cfg.output_dir / "adapter"), expected_fedavg(cfg)
    tol = 0.0
    if mode == "masking":
        tol = FixedPointCodec(clip=CLIP, n_silos=2, bits=32).sum_tolerance(2)
    elif mode == "he":
        tol = he.HeParams(clip=CLIP).codec.sum_tolerance(2)
    assert np.abs(got - want).max() <= tol + 1e-6
