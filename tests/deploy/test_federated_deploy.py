"""deploy/federated run verbatim on loopback: SuperLink, two authenticated SuperNodes, TLS, masking."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.deploy.steps import (
    REPO,
    Processes,
    assert_peft_adapter,
    assert_serves_tls,
    environment,
    exported,
    free_port,
    read_steps,
    wait_for_port,
)

DEPLOY = REPO / "deploy" / "federated"


def test_commands_file_names_every_step() -> None:
    steps = read_steps(DEPLOY / "commands.sh")
    assert list(steps) == [
        "settings", "keygen", "superlink", "connection", "register", "check-0",
        "supernode-0", "supernode-1", "run",
    ]  # fmt: skip
    assert exported(steps["settings"]) == ["SUPERLINK_HOST", "SUPERLINK_PORT", "FLWR_HOME"]
    # Two SuperNodes on one host: each its own runtime port.
    assert "--port 9094" in steps["supernode-0"] and "--port 9095" in steps["supernode-1"]
    assert '>> "$FLWR_HOME/config.toml"' in steps["connection"]  # appends, never overwrites


def test_docs_show_these_exact_commands() -> None:
    doc = (REPO / "docs/federated.md").read_text(encoding="utf-8")
    for name, text in read_steps(DEPLOY / "commands.sh").items():
        assert text in doc, f"docs/federated.md lacks step {name} of deploy/federated/commands.sh"


@pytest.mark.slow
def test_federated_deployment_from_deploy_folder(tmp_path: Path) -> None:
    for yaml in DEPLOY.glob("*.yaml"):
        shutil.copy(yaml, tmp_path)
    steps = read_steps(DEPLOY / "commands.sh")
    port = free_port()
    env = environment(
        {
            "SUPERLINK_HOST": "127.0.0.1",
            "SUPERLINK_PORT": str(port),
            "FLWR_HOME": str(tmp_path / "flwr-home"),
        }
    )
    procs = Processes(tmp_path, env)
    try:
        assert procs.run("keygen", steps["keygen"], 120).returncode == 0, procs.log("keygen")
        superlink = procs.start("superlink", steps["superlink"])
        wait_for_port("127.0.0.1", port, superlink, 120)
        assert_serves_tls("127.0.0.1", port, tmp_path / "keys" / "silo-0" / "ca.pem")
        assert procs.run("connection", steps["connection"], 30).returncode == 0
        # Before registration the check names the missing piece, in one line, and fails.
        early = procs.run("check-early", steps["check-0"], 120)
        assert early.returncode == 1, procs.log("check-early")
        assert "Traceback" not in early.stderr
        problems = [line for line in early.stderr.splitlines() if line.startswith("problem:")]
        assert len(problems) == 1 and "not registered" in problems[0], early.stderr
        assert procs.run("register", steps["register"], 120).returncode == 0, procs.log("register")
        check = procs.run("check-0", steps["check-0"], 120)
        assert check.returncode == 0, procs.log("check-0")
        assert "knows this SuperNode key" in check.stdout
        for k in (0, 1):  # two SuperNodes on this host: free runtime ports instead of 9094/9095
            text = steps[f"supernode-{k}"].replace(f"--port {9094 + k}", f"--port {free_port()}")
            procs.start(f"supernode-{k}", text)
        run = procs.run("run", steps["run"], 1500)
        assert run.returncode == 0, procs.log("run")[-3000:]
        out = tmp_path / "runs" / "coordinator"
        assert (out / "summary.json").is_file(), procs.log("run")[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"] == 2 and summary["silos"] == 2
        assert summary["secure_aggregation"] == "masking"
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["silos"] for r in records if r["split"] == "train"] == [2, 2]
        assert_peft_adapter(out / "adapter")
        # flwr kept its state in the deployment's FLWR_HOME, not in ~/.flwr.
        assert (tmp_path / "flwr-home" / "config.toml").is_file()
        for k in (0, 1):
            assert procs.started[f"supernode-{k}"].poll() is None, procs.log(f"supernode-{k}")
    finally:
        procs.stop_all()
    for name, proc in procs.started.items():
        assert proc.poll() is not None, f"{name} still runs"
