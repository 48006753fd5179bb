"""`silotune federate check` names the missing piece of a silo's setup; `federate app` is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from silotune.federated.deploy_check import app_path, check_silo
from silotune.keygen import generate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def silo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of deploy/federated with keys from keygen, as the current folder."""
    shutil.copy(REPO / "deploy" / "federated" / "silo-0.yaml", tmp_path)
    generate(tmp_path / "keys", 2, ["127.0.0.1"])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _check(superlink: str | None = None) -> list[str]:
    keys = Path("keys/silo-0")
    report = check_silo(Path("silo-0.yaml"), keys / "ca.pem", keys / "supernode.key", superlink)
    return report.problems


def test_a_complete_silo_passes(silo: Path) -> None:
    assert _check() == []


def test_each_missing_piece_is_named(silo: Path) -> None:
    (silo / "keys/silo-0/identity.pem").unlink()
    (silo / "keys/silo-0/ca.pem").unlink()
    problems = _check()
    assert len(problems) == 2
    assert "federation.identity_key keys/silo-0/identity.pem does not exist" in problems[0]
    assert "root certificate keys/silo-0/ca.pem does not exist" in problems[1]


def test_a_silo_of_another_enrollment_is_refused(silo: Path) -> None:
    other = generate(silo / "other", 1, ["127.0.0.1"])
    shutil.copy(
        next(p for p in other if p.name == "identity.pem"), silo / "keys/silo-0/identity.pem"
    )
    [problem] = _check()
    assert "identity or enrollment unusable" in problem


def test_simulation_and_loose_key_permissions_are_problems(silo: Path) -> None:
    text = (silo / "silo-0.yaml").read_text().replace("simulation: false", "simulation: true")
    (silo / "silo-0.yaml").write_text(text)
    os.chmod(silo / "keys/silo-0/supernode.key", 0o644)
    problems = _check()
    assert any("federation.simulation is true" in p for p in problems)
    assert any("readable by other users" in p for p in problems)


def test_an_unreachable_superlink_is_one_line(silo: Path) -> None:
    [problem] = _check("127.0.0.1:9")  # discard port: nothing listens
    assert problem.startswith("SuperLink 127.0.0.1:9 not reachable")


def test_cli_prints_one_line_per_problem_and_exits_1(silo: Path) -> None:
    (silo / "keys/silo-0/enrollment.json").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "silotune.cli", "federate", "check", "silo-0.yaml",
         "--root-certificates", "keys/silo-0/ca.pem",
         "--auth-supernode-private-key", "keys/silo-0/supernode.key"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    problems = [line for line in result.stderr.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1 and "federation.enrollment" in problems[0]


def test_the_flower_app_ships_in_the_package() -> None:
    """`flwr run "$(silotune federate app)"` needs only the installed package."""
    from flwr.cli.config_utils import load_and_validate

    folder = app_path()
    assert folder.is_dir() and REPO / "flower" != folder
    config, _ = load_and_validate(folder / "pyproject.toml")  # imports the components too
    components = config["tool"]["flwr"]["app"]["components"]
    assert components["serverapp"] == "silotune.federated.app:server_app"
    assert components["clientapp"] == "silotune.federated.app:client_app"
