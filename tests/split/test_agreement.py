"""Split settings agreed at join: a silo whose settings differ is refused before its first step."""

from __future__ import annotations

import logging
import socket

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file

from silotune.config import JobConfig, config_from_dict
from silotune.errors import ModelError
from silotune.models.loading import load_model
from silotune.split import runner
from silotune.split.agreement import settings_digest, shared_settings
from silotune.split.parts import PartState, build_half, save_full_adapter
from silotune.split.session import SplitError
from silotune.split.silo import TrunkLink
from tests.conftest import assert_clean_error
from tests.split.conftest import open_silo, run_threads, settings_of, split_cfg, trunk_server


def job(base: JobConfig, *overrides: str) -> JobConfig:
    """``base`` with ``key=value`` overrides (as ``--set`` takes them)."""
    return config_from_dict(base.model_dump(mode="json"), list(overrides))


def test_defaults_and_spelled_out_values_agree():
    implicit = split_cfg()
    explicit = job(implicit, "adapter.alpha=16", "adapter.target_modules=[v_proj, q_proj]")
    assert settings_of(implicit) == settings_of(explicit)
    assert settings_digest(settings_of(implicit)) == settings_digest(settings_of(explicit))
    # What each side chooses for itself is not compared.
    own = job(implicit, "train.lr=0.5", "split.noise_sigma=0.1", "split.server_mode=sequential")
    assert settings_of(own) == settings_of(implicit)


COORDINATOR = ("adapter.r=8",)
PREFIX = ("adapter.type=prefix", "adapter.num_virtual_tokens=16")


@pytest.mark.parametrize(
    ("coordinator", "silo", "expected"),
    [
        (COORDINATOR, ["split.head_layers=2"], ["split.head_layers silo 2, coordinator 1"]),
        (COORDINATOR, ["adapter.r=16"], ["adapter.r silo 16, coordinator 8"]),
        (
            COORDINATOR,
            ["adapter.target_modules=[q_proj, k_proj, v_proj]"],
            ['adapter.target_modules silo ["k_proj", "q_proj", "v_proj"], coordinator ["q_proj"'],
        ),
        (
            COORDINATOR,
            ["split.activation_dtype=bfloat16"],
            ['split.activation_dtype silo "bfloat16", coordinator "float32"'],
        ),
        (COORDINATOR, ["split.sync_every=5"], ["split.sync_every silo 5, coordinator 10"]),
        (
            COORDINATOR,
            ["train.seed=1"],
            ["train.seed silo 1, coordinator 0"],
        ),  # tiny-llama's weights
        (
            PREFIX,
            [*PREFIX[:1], "adapter.num_virtual_tokens=8"],
            ["adapter.num_virtual_tokens silo 8"],
        ),
        (  # SPF rows chosen at other ratios: other deltas, another averaged vector
            (*COORDINATOR, "adapter.spf.enabled=true"),
            ["adapter.spf.head_ratio=0.25"],
            ["adapter.spf.head_ratio silo 0.25, coordinator 0.5"],
        ),
        (  # the case: both keys named at once
            COORDINATOR,
            ["split.head_layers=2", "adapter.r=16"],
            ["adapter.r silo 16, coordinator 8", "split.head_layers silo 2, coordinator 1"],
        ),
    ],
    ids="head_layers r targets dtype sync_every seed prefix_length spf_ratio two".split(),
)
def test_a_mismatched_silo_is_refused_at_join_naming_each_key(
    coordinator, silo, expected, keys_dir, caplog
):
    theirs = job(split_cfg(), *coordinator)
    mine = job(theirs, *silo)
    with trunk_server(theirs, keys_dir) as (service, connect_fn):
        link = TrunkLink(open_silo(connect_fn, keys_dir, "silo-0"), timeout=30)
        link.averaging = mine.split.secure_averaging
        with caplog.at_level(logging.ERROR, logger="silotune.split.trunk"):
            with pytest.raises(SplitError) as info:
                link.join(10, settings_of(mine))
    message = str(info.value)
    assert message.startswith("the coordinator refused this silo at join")
    assert "\n" not in message
    for part in expected:
        assert part in message
    if "spf" in " ".join(expected):  # the ratio alone differs, so it alone is named
        assert message.count(", coordinator ") == 1
    # The coordinator refused it too, said why, and never let it into the roster.
    (record,) = service.records
    assert record.outcome == "refused" and all(part in record.detail for part in expected)
    assert any("refused silo 'silo-0' at join" in r.getMessage() for r in caplog.records)
    assert service.engine.roster.joined == 0


def test_a_silo_without_settings_is_rejected(keys_dir):
    cfg = split_cfg()
    with trunk_server(cfg, keys_dir) as (service, connect_fn):
        session = open_silo(connect_fn, keys_dir, "silo-0")
        session.send("join", 0, meta={"examples": 10, "averaging": "masking"})
        with pytest.raises(SplitError, match="must carry 'settings'"):
            session.recv(30)
    assert [r.outcome for r in service.records] == ["rejected"]


def test_an_adapter_plain_peft_cannot_load_is_never_written(tmp_path):
    """The issue's broken adapter: rank-16 config, rank-8 trunk tensors. Refused, nothing written."""
    silo_half = build_half(job(split_cfg(), "adapter.r=16"), "silo")
    trunk_half = build_half(split_cfg(), "trunk")  # rank 8
    state = PartState(silo_half.model, [silo_half.parts.head, silo_half.parts.tail]).get(
        [silo_half.parts.head, silo_half.parts.tail]
    )
    state.update(
        PartState(trunk_half.model, [trunk_half.parts.trunk]).get([trunk_half.parts.trunk])
    )
    out = tmp_path / "adapter"
    with pytest.raises(ModelError, match=r"declares LoRA rank 16.*has shape \(8, 128\)"):
        save_full_adapter(silo_half.model, state, out)
    assert not out.exists()


def _free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_join_refuses_a_mismatched_silo_in_one_line_and_a_matching_one_trains(
    keys_dir, tls_dir, tmp_path, main_in_process
):
    common = {"address": _free_address(), "keys_dir": keys_dir, "tls_dir": tls_dir}
    coordinator = split_cfg(**common)  # one silo, two steps
    coordinator.output_dir = tmp_path / "coordinator"
    results = {}
    errors = []

    def serve():
        try:
            results["coordinator"] = runner.serve(coordinator)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    recipe = job(coordinator, "split.head_layers=2", "adapter.r=16", "split.silo_name=silo-1")
    recipe.output_dir = tmp_path / "silo-1"
    path = tmp_path / "silo-1.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    good = job(coordinator)
    good.output_dir = tmp_path / "silo-0"

    def join_both():
        refused = main_in_process("join", str(path), cwd=tmp_path)
        assert_clean_error(refused, "refused this silo at join")
        assert "adapter.r silo 16, coordinator 8" in refused.stderr
        assert "split.head_layers silo 2, coordinator 1" in refused.stderr
        results["silo"] = runner.join(good, "silo-0")

    assert run_threads(serve, join_both, timeout=300) == [None, None]
    assert not errors, errors
    sessions = {s["silo"]: s for s in results["coordinator"]["sessions"]}
    assert sessions["silo-1"]["outcome"] == "refused"
    assert "adapter.r silo 16, coordinator 8" in sessions["silo-1"]["detail"]
    assert sessions["silo-0"]["outcome"] == "finished" and sessions["silo-0"]["steps"] == 2
    assert results["silo"]["settings_digest"] == settings_digest(
        shared_settings(good, build_half(good, "trunk").model)
    )
    # The saved adapter loads with plain PEFT and holds the coordinator's trunk tensors.
    adapter = tmp_path / "silo-0" / "adapter"
    model = PeftModel.from_pretrained(load_model("tiny-llama").model, adapter)
    assert model.peft_config["default"].r == 8
    trunk = load_file(tmp_path / "coordinator" / "trunk_adapter.safetensors")
    saved = load_file(adapter / "adapter_model.safetensors")
    assert all(torch.equal(saved[name], tensor) for name, tensor in trunk.items())
