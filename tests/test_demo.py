"""`silotune demo` runs its sections end to end and reports before/after scores."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

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
    for section in ("untrained", *SECTIONS):
        scores = results[section]["test"]
        assert 0.0 <= scores["accuracy"] <= 1.0 and scores["examples"] == 80
    for section in SECTIONS:
        assert (tmp_path / section / "adapter" / "adapter_model.safetensors").is_file()
    assert "test accuracy" in out.getvalue() and "federated (3 silos, he)" in out.getvalue()
