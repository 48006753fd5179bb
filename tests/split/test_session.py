"""Frame sessions: handshake first, then sealed frames; adapter states split across frames."""

from __future__ import annotations

import pytest
import torch

from silotune.split.keys import load_coordinator_keys, load_silo_keys
from silotune.split.session import accept_session, open_session
from silotune.transport import inprocess_pair
from silotune.transport.frames import FrameError
from tests.split.conftest import run_threads


def _pair(keys_dir):
    silo_end, coordinator_end = inprocess_pair(("silo", "coordinator"))
    sessions = {}

    def silo():
        sessions["silo"] = open_session(silo_end, *load_silo_keys(keys_dir, "silo-0"), timeout=10)

    def coordinator():
        identity, enrollment = load_coordinator_keys(keys_dir)
        sessions["coordinator"] = accept_session(coordinator_end, identity, enrollment, timeout=10)

    assert run_threads(silo, coordinator, timeout=30) == [None, None]
    return sessions["silo"], sessions["coordinator"]


def test_large_adapter_state_travels_in_several_sealed_frames(keys_dir):
    silo, coordinator = _pair(keys_dir)
    assert coordinator.peer_name == "silo-0"
    state = {f"layers.{i}.lora_A.weight": torch.randn(4, 8) for i in range(130)}
    silo.send_state("sync", 3, state, {"examples": 7})
    first = coordinator.recv(5)
    assert (first.kind, first.meta["examples"], first.meta["parts"]) == ("sync", 7, 3)
    received = coordinator.recv_state(first, 5)
    assert received.keys() == state.keys()
    assert all(torch.equal(received[k], state[k]) for k in state)
    assert silo.stats.sent_frames == 3 and coordinator.stats.received_frames == 3


def test_a_state_missing_a_part_is_rejected(keys_dir):
    silo, coordinator = _pair(keys_dir)
    state = {f"t{i}": torch.zeros(1) for i in range(60)}  # two parts
    silo.send("sync", 0, {"t0": state["t0"]}, {"part": 0, "parts": 2})
    silo.send("forward", 0, {"x": torch.zeros(1)})
    with pytest.raises(FrameError, match="expected part 1"):
        coordinator.recv_state(coordinator.recv(5), 5)
