"""Project-wide checks: lint clean, strict typing of the security packages, no unsafe loading."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "silotune"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint_is_clean() -> None:
    result = _run("ruff", "check", "src", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_security_packages_pass_mypy_strict() -> None:
    packages = [
        str(SRC / name) for name in ("crypto", "transport", "enclave") if (SRC / name).is_dir()
    ]
    result = _run("mypy", "--strict", *packages)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_pickle_or_unsafe_torch_load_in_the_package() -> None:
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", text, re.M):
            offenders.append(f"{path}: imports pickle")
        for call in re.findall(r"(?<![\w.])torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path}: {call}")
    assert not offenders, offenders
