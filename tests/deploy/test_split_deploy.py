"""deploy/split run verbatim on loopback: `silotune serve` and two `silotune join`, gRPC + TLS."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.deploy import steps as d


@pytest.mark.slow
def test_split_deployment_from_deploy_folder(tmp_path: Path) -> None:
    port = d.free_port()
    variables = {"COORDINATOR_HOST": "127.0.0.1", "COORDINATOR_PORT": str(port)}
    with d.deployment("split", tmp_path, variables) as (steps, procs):
        assert procs.run("keygen", steps["keygen"], 120).returncode == 0, procs.log("keygen")
        serve = procs.start("serve", steps["serve"])
        d.wait_for_port("127.0.0.1", port, serve, 300)
        d.assert_serves_tls("127.0.0.1", port, tmp_path / "keys" / "silo-0" / "ca.pem")
        joins = [procs.start(f"join-{k}", steps[f"join-{k}"]) for k in (0, 1)]
        deadline = time.monotonic() + 1200
        while time.monotonic() < deadline and any(p.poll() is None for p in [serve, *joins]):
            time.sleep(1)
        for name in ("serve", "join-0", "join-1"):
            assert procs.started[name].returncode == 0, f"{name}: {procs.log(name)[-3000:]}"
        trunk = tmp_path / "runs" / "coordinator"
        assert (trunk / "trunk_adapter.safetensors").is_file()
        summary = json.loads((trunk / "summary.json").read_text())
        assert [s["outcome"] for s in summary["sessions"]] == ["finished", "finished"]
        for k in (0, 1):
            out = tmp_path / "runs" / f"silo-{k}"
            silo = json.loads((out / "summary.json").read_text())
            assert "settings_digest" in silo
            d.assert_peft_adapter(out / "adapter")
