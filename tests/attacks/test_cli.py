"""`silotune attack`: lists attacks, refuses unknown ones with one line, runs one to a JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def silotune(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "silotune.cli", *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip


def test_attack_lists_and_refuses_unknown_names() -> None:
    listed = silotune("attack", "--list")
    assert listed.returncode == 0 and "split-nearest" in listed.stdout
    bad = silotune("attack", "nope", "configs/split-tiny.yaml")
    assert bad.returncode == 1 and "unknown attack 'nope'" in bad.stderr


def test_attack_runs_on_a_split_recipe_and_ends_in_one_json_line() -> None:
    out = silotune(
        "attack", "split-nearest", "configs/split-tiny.yaml", "--set", "split.head_layers=0"
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    (row,) = result["results"]
    assert result["attack"] == "split-nearest" and row["setting"]["head_layers"] == 0
    assert row["leakage"] == 1.0 > row["chance"]
