"""deploy/federated run verbatim on loopback: SuperLink, two authenticated SuperNodes, TLS, masking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.deploy import steps as d


@pytest.mark.slow
def test_federated_deployment_from_deploy_folder(tmp_path: Path) -> None:
    port = d.free_port()
    variables = {
        "SUPERLINK_HOST": "127.0.0.1",
        "SUPERLINK_PORT": str(port),
        "FLWR_HOME": str(tmp_path / "flwr-home"),
    }
    with d.deployment("federated", tmp_path, variables) as (steps, procs):
        assert procs.run("keygen", steps["keygen"], 120).returncode == 0, procs.log("keygen")
        superlink = procs.start("superlink", steps["superlink"])
        d.wait_for_port("127.0.0.1", port, superlink, 120)
        d.assert_serves_tls("127.0.0.1", port, tmp_path / "keys" / "silo-0" / "ca.pem")
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
            text = steps[f"supernode-{k}"].replace(f"--port {9094 + k}", f"--port {d.free_port()}")
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
        d.assert_peft_adapter(out / "adapter")
        # flwr kept its state in the deployment's FLWR_HOME, not in ~/.flwr.
        assert (tmp_path / "flwr-home" / "config.toml").is_file()
        for k in (0, 1):
            assert procs.started[f"supernode-{k}"].poll() is None, procs.log(f"supernode-{k}")
