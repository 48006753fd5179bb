"""deploy/'s commands files name the steps the tests run, and the docs show exactly those commands."""

from __future__ import annotations

import pytest

from tests.deploy.steps import REPO, exported, read_steps

STEPS = {
    "federated": [
        "settings", "keygen", "superlink", "connection", "register", "check-0",
        "supernode-0", "supernode-1", "run",
    ],
    "split": ["settings", "keygen", "serve", "join-0", "join-1"],
}  # fmt: skip
SETTINGS = {
    "federated": ["SUPERLINK_HOST", "SUPERLINK_PORT", "FLWR_HOME"],
    "split": ["COORDINATOR_HOST", "COORDINATOR_PORT"],
}
DOCS = {"federated": "docs/federated.md", "split": "docs/split.md"}


@pytest.mark.parametrize("mode", sorted(STEPS))
def test_commands_file_names_every_step(mode: str) -> None:
    steps = read_steps(REPO / "deploy" / mode / "commands.sh")
    assert list(steps) == STEPS[mode]
    assert exported(steps["settings"]) == SETTINGS[mode]  # all a test substitutes, with ports


@pytest.mark.parametrize("mode", sorted(STEPS))
def test_docs_show_these_exact_commands(mode: str) -> None:
    doc = (REPO / DOCS[mode]).read_text(encoding="utf-8")
    for name, text in read_steps(REPO / "deploy" / mode / "commands.sh").items():
        assert text in doc, f"{DOCS[mode]} lacks step {name} of deploy/{mode}/commands.sh"


def test_federated_steps_keep_flower_state_apart() -> None:
    steps = read_steps(REPO / "deploy" / "federated" / "commands.sh")
    # Two SuperNodes on one host: each its own runtime port.
    assert "--port 9094" in steps["supernode-0"] and "--port 9095" in steps["supernode-1"]
    assert '>> "$FLWR_HOME/config.toml"' in steps["connection"]  # appends, never overwrites
    assert '"$(silotune federate app)"' in steps["run"]  # the installed app, not a checkout
