"""`silotune bench eval --quick`: both paths score alike, and the JSON has the issue's schema."""

from __future__ import annotations

from rich.console import Console

from silotune.bench import eval as eval_bench


def test_quick_bench_eval() -> None:
    result = eval_bench.run(quick=True, console=Console(quiet=True))
    assert result["bench"] == "eval"
    per_label, one_pass = result["results"]["per_label"], result["results"]["one_pass"]
    assert per_label["seconds"] > 0 and one_pass["seconds"] > 0
    assert one_pass["max_abs_diff"] <= 1e-5
    assert one_pass["accuracy"] == per_label["accuracy"]
    assert one_pass["macro_f1"] == per_label["macro_f1"]
    assert one_pass["tokens"] < per_label["tokens"] / 2  # the prompt is read once, not 4 times
