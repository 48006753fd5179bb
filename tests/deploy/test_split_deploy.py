"""deploy/split run verbatim on loopback: `silotune serve` and two `silotune join`, gRPC + TLS."""

from __future__ import annotations

import json
import shutil
import time
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

DEPLOY = REPO / "deploy" / "split"


def test_commands_file_names_every_step() -> None:
    steps = read_steps(DEPLOY / "commands.sh")
    assert list(steps) == ["settings", "keygen", "serve", "join-0", "join-1"]
    assert exported(steps["settings"]) == ["COORDINATOR_HOST", "COORDINATOR_PORT"]


def test_docs_show_these_exact_commands() -> None:
    doc = (REPO / "docs/split.md").read_text(encoding="utf-8")
    for name, text in read_steps(DEPLOY / "commands.sh").items():
        assert text in doc, f"docs/split.md lacks step {name} of deploy/split/commands.sh"


@pytest.mark.slow
def test_split_deployment_from_deploy_folder(tmp_path: Path) -> None:
    for yaml in DEPLOY.glob("*.yaml"):
        shutil.copy(yaml, tmp_path)
    steps = read_steps(DEPLOY / "commands.sh")
    port = free_port()
    env = environment({"COORDINATOR_HOST": "127.0.0.1", "COORDINATOR_PORT": str(port)})
    procs = Processes(tmp_path, env)
    try:
        assert procs.run("keygen", steps["keygen"], 120).returncode == 0, procs.log("keygen")
        serve = procs.start("serve", steps["serve"])
        wait_for_port("127.0.0.1", port, serve, 300)
        assert_serves_tls("127.0.0.1", port, tmp_path / "keys" / "silo-0" / "ca.pem")
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
            assert_peft_adapter(out / "adapter")
    finally:
        procs.stop_all()
    for name, proc in procs.started.items():
        assert proc.poll() is not None, f"{name} still runs"
