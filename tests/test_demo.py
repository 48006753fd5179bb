"""`silotune demo` runs its sections end to end and reports before/after scores."""

from __future__ import annotations

import io
import math

import pytest
from rich.console import Console
from safetensors.torch import load_file

from silotune.demo import SECTIONS, run_demo, section_config
from silotune.errors import ConfigError


def test_sections_see_the_same_number_of_examples(tmp_path) -> None:
    cent = section_config("centralized", 40, tmp_path / "c")
    fed = section_config("federated", 40, tmp_path / "f")
    split = section_config("split", 40, tmp_path / "s")
    assert cent.train.max_steps == 40
    assert fed.federation.rounds * fed.federation.local_steps == 40
    assert split.train.max_steps * split.split.silos == 40
    assert fed.federation.secure_aggregation == "he" and fed.federation.silos == 3


def test_unknown_section_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown demo section 'gossip'"):
        run_demo(4, tmp_path, Console(file=io.StringIO()), sections=("gossip",))


@pytest.mark.slow
def test_demo_runs_every_section_and_prints_the_table(tmp_path) -> None:
    out = io.StringIO()
    results = run_demo(8, tmp_path, Console(file=out, width=160), sections=SECTIONS)
    printed = out.getvalue()
    assert "test accuracy" in printed and "federated (3 silos, he)" in printed
    for section in ("untrained", *SECTIONS):
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
