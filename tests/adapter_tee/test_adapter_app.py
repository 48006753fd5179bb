"""Adapter placement enclave, in process: equal to the plain trainer, masked traffic, once-only calls."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from silotune.adapter_tee.app import check_enclave_job, enclave_app_config
from silotune.adapter_tee.masked_linear import FrozenLinearServer, OutsourcedLinear, from_wire
from silotune.adapter_tee.runner import LocalEnclave, compare_with_plain, load_ree_model
from silotune.config import JobConfig
from silotune.dispatch import run_job
from silotune.enclave.base import EnclaveError
from silotune.errors import ConfigError
from tests.conftest import FAST_JOB

Tensors = dict[str, torch.Tensor]
JOB = {**FAST_JOB, "adapter": {"type": "lora", "r": 4, "placement": "enclave"}}
ENCLAVE_JOB = {**JOB, "enclave": {"mask_std": 1e4}}


@pytest.mark.parametrize("unblinding", ["offline", "online"])
def test_enclave_training_equals_the_plain_trainer(unblinding: str) -> None:
    job = {**ENCLAVE_JOB, "enclave": {"mask_std": 1e4, "unblinding": unblinding}}
    result = compare_with_plain(job, steps=4, in_process=True)
    assert result["unblinding"] == unblinding
    assert result["max_abs_diff"] <= 1e-5
    assert result["elements_over_1e-5"] == 0 and result["elements"] > 0
    assert result["rel_diff"] <= 1e-5
    assert result["max_loss_diff"] <= 1e-4
    assert result["plain_losses"][0] == pytest.approx(result["enclave_losses"][0], abs=1e-5)
    assert result["plain_step_s"] > 0 and result["enclave_step_s"] > 0
    assert result["ocalls_per_step"] > 0 and result["bytes_to_ree_per_step"] > 0


@pytest.fixture(params=["offline", "online"])
def local(
    make_job: Callable[..., JobConfig], request: pytest.FixtureRequest
) -> tuple[JobConfig, LocalEnclave]:
    cfg = make_job(
        "adapter.placement=enclave", "enclave.mask_std=1e4", f"enclave.unblinding={request.param}"
    )
    return cfg, LocalEnclave(enclave_app_config(cfg))


Sent = list[tuple[str, str, torch.Tensor]]
Clear = dict[tuple[str, str], list[torch.Tensor]]


def _recording(enclave: LocalEnclave, cfg: JobConfig) -> tuple[Callable[..., Any], Sent, Clear]:
    """An REE that keeps what it is sent, and hooks that keep the clear tensors behind it."""
    server = FrozenLinearServer.from_model(load_ree_model(cfg).model)
    sent: Sent = []

    def ree(method: str, meta: dict[str, Any], tensors: Tensors) -> tuple[dict, Tensors]:
        sent.extend((method, meta["name"], from_wire(t).clone()) for t in tensors.values())
        return server(method, meta, tensors)

    clear: Clear = {}
    for module in enclave.app.model.modules():
        if isinstance(module, OutsourcedLinear):
            name = module.ree_name
            module.register_forward_hook(
                lambda m, a, o, n=name: clear.setdefault(("linear", n), []).append(a[0].detach())
            )
            module.register_full_backward_hook(
                lambda m, gi, go, n=name: clear.setdefault(("linear_t", n), []).append(go[0])
            )
    return ree, sent, clear


def _mask_rows(sent: Sent, clear: Clear) -> list[tuple[int, ...]]:
    """One key per mask row (token) the REE received: the row of ``sent - clear``, normalised.

    A tensor sent to several layers (q, k and v) counts once. Two rows of one mask ``z`` give
    the same key whatever the tensors' scales, so a reused mask shows as a repeated key.
    """
    keys, seen = [], set()
    for method, name, tensor in sent:
        digest = hash(tensor.numpy().tobytes())
        if digest in seen:
            continue
        seen.add(digest)
        (truth,) = clear[(method, name)]
        rows = (tensor - truth.double()).reshape(-1, tensor.shape[-1])
        rows = rows / rows.norm(dim=-1, keepdim=True)
        keys += [tuple(int(v) for v in (row[:8] * 1e6).round()) for row in rows]
    return keys


def _masks_of_steps(enclave: LocalEnclave, cfg: JobConfig, steps: int) -> list[tuple[int, ...]]:
    ree, sent, clear = _recording(enclave, cfg)
    keys = []
    for step in range(steps):
        sent.clear()
        clear.clear()
        if cfg.enclave.unblinding == "offline":
            enclave.call("preprocess", {}, {}, ree)
        enclave.call("train_step", {"step": step}, {}, ree)
        keys += _mask_rows(sent, clear)
    return keys


def test_every_mask_row_reaches_the_ree_once(local: tuple[JobConfig, LocalEnclave]) -> None:
    cfg, enclave = local
    keys = _masks_of_steps(enclave, cfg, 3)  # the first step learns the sites; then the pool
    assert len(keys) > 1000
    assert len(set(keys)) == len(keys)


def test_the_mask_row_check_catches_a_reused_mask(make_job: Callable[..., JobConfig]) -> None:
    """The check above fails when masks are reused (the test-only hook of the attacks)."""
    from silotune.attacks.tee_masks import reused_masks

    cfg = make_job("adapter.placement=enclave", "enclave.unblinding=offline")
    with reused_masks():
        keys = _masks_of_steps(LocalEnclave(enclave_app_config(cfg)), cfg, 2)
    assert len(set(keys)) < len(keys) / 2


def test_the_ree_sees_only_fresh_masked_tensors(local: tuple[JobConfig, LocalEnclave]) -> None:
    cfg, enclave = local
    ree, sent, clear = _recording(enclave, cfg)
    blocks: list[range] = []
    draw = enclave.app.offload.masks.gaussian

    def spy(shape: tuple[int, ...]) -> Any:
        mask = draw(shape)
        blocks.append(range(mask.first_block, mask.first_block + mask.n_blocks))
        return mask

    enclave.app.offload.masks.gaussian = spy  # type: ignore[method-assign]
    info, _ = enclave.call("train_step", {"step": 0}, {}, ree)
    assert info["ocalls"] == len(sent) > 0
    assert {m for m, _, _ in sent} == {"linear", "linear_t"}
    for method, name, tensor in sent:
        truths = clear[(method, name)]
        for truth in truths:
            assert tensor.shape == truth.shape
            assert not bool((tensor == truth.double()).any()), (method, name)  # none in clear
            assert float((tensor - truth).abs().mean()) > 100 * float(truth.abs().max())
    # Online: one mask per distinct tensor and one check vector per ocall (offline: the pool
    # draws them in blocks of rows), each from keystream that nothing else touched.
    if cfg.enclave.unblinding == "online":
        assert len(blocks) == info["masks"] + info["ocalls"]
    else:
        assert info["pool_rows_used"] > 0 and info["pool_refills"] > 0  # the first step learns
    used = [b for r in blocks for b in r]
    assert len(used) == len(set(used))


def test_preprocessing_leaves_the_step_no_frozen_matmul(make_job: Callable[..., JobConfig]) -> None:
    cfg = make_job("adapter.placement=enclave", "enclave.unblinding=offline")
    enclave = LocalEnclave(enclave_app_config(cfg))
    server = FrozenLinearServer.from_model(load_ree_model(cfg).model)
    enclave.call("preprocess", {}, {}, server)
    enclave.call("train_step", {"step": 0}, {}, server)  # learns which layers share a mask
    pre, _ = enclave.call("preprocess", {}, {}, server)
    assert pre["preprocess_s"] > 0 and pre["pool_bytes"] > 0 and pre["rows"] > 0
    info, _ = enclave.call("train_step", {"step": 1}, {}, server)
    assert info["pool_refills"] == 0 and info["inline_preprocess_s"] == 0
    assert info["pool_rows_used"] > 0 and info["masks"] > 0
    assert info["factors_online"] == 0  # no frozen matmul left in the step


def test_every_call_runs_once_and_in_order(local: tuple[JobConfig, LocalEnclave]) -> None:
    cfg, enclave = local
    server = FrozenLinearServer.from_model(load_ree_model(cfg).model)
    with pytest.raises(EnclaveError, match="next step is 0"):
        enclave.call("train_step", {"step": 1}, {}, server)
    with pytest.raises(EnclaveError, match="released only after the last step"):
        enclave.call("release", {}, {}, server)
    with pytest.raises(EnclaveError, match="no validation evaluation is due at step 0"):
        enclave.call("evaluate", {"split": "validation"}, {}, server)
    enclave.call("train_step", {"step": 0}, {}, server)
    with pytest.raises(EnclaveError, match="next step is 1"):
        enclave.call("train_step", {"step": 0}, {}, server)  # no replay of a batch
    enclave.call("train_step", {"step": 1}, {}, server)
    info, _ = enclave.call("evaluate", {"split": "validation"}, {}, server)  # eval_every = 2
    assert 0.0 <= info["scores"]["accuracy"] <= 1.0
    with pytest.raises(EnclaveError, match="each runs once"):
        enclave.call("evaluate", {"split": "validation"}, {}, server)
    with pytest.raises(EnclaveError, match="no method 'weights'"):
        enclave.call("weights", {}, {}, server)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("adapter.type=prefix", "supports adapter.type lora only"),
        ("adapter.spf.enabled=true", "adapter.spf.enabled is not supported"),
        ("model.dtype=bfloat16", "set model.dtype to float32 or auto"),
    ],
)
def test_jobs_the_enclave_cannot_run_are_refused(
    make_job: Callable[..., JobConfig], override: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        check_enclave_job(make_job("adapter.placement=enclave", override))


def test_non_llama_models_are_refused(
    make_job: Callable[..., JobConfig], tiny_hf_folder: Callable[[str], Path]
) -> None:
    cfg = make_job("adapter.placement=enclave", f"model.name={tiny_hf_folder('gpt2')}")
    with pytest.raises(ConfigError, match="supports model types llama, mistral, qwen2"):
        load_ree_model(cfg)


def test_split_mode_is_refused(make_job: Callable[..., JobConfig]) -> None:
    with pytest.raises(ConfigError, match="runs in modes centralized and federated, not split"):
        run_job(make_job("adapter.placement=enclave", "mode=split"), progress=False)


def test_resume_is_refused(make_job: Callable[..., JobConfig]) -> None:
    with pytest.raises(
        ConfigError, match="--resume with adapter.placement enclave needs enclave.platform_key"
    ):
        run_job(make_job("adapter.placement=enclave"), resume=True, progress=False)


def test_the_measured_configuration_binds_the_model_files(
    make_job: Callable[..., JobConfig], tiny_hf_folder: Callable[[str], Path], tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_hf_folder("llama"), folder)
    cfg = make_job("adapter.placement=enclave", f"model.name={folder}")
    app_config = enclave_app_config(cfg)
    assert len(app_config["model_sha256"]) == 64
    assert enclave_app_config(make_job("adapter.placement=enclave"))["model_sha256"] is None
    LocalEnclave(app_config)  # the files it was measured with: starts
    with (folder / "config.json").open("a") as fh:
        fh.write("\n")  # still the same model to transformers, other bytes to the measurement
    with pytest.raises(EnclaveError, match="refusing other weights"):
        LocalEnclave(app_config)
