"""Over gRPC + TLS on loopback: only enrolled silos get in, bad frames end only their session,
and a silo that vanishes mid-step leaves the others training."""

from __future__ import annotations

import math

import pytest
import torch

from silotune.crypto.identity import IdentityKey
from silotune.split.keys import load_silo_keys
from silotune.split.session import SplitError, open_session
from silotune.transport.base import ConnectionClosed
from tests.split.conftest import (
    make_stream,
    open_silo,
    run_threads,
    silo_end,
    split_cfg,
    train_silo,
    trunk_server,
)


class Meddler:
    """Wraps a connection and meddles with the ``at``-th message it sends (1-based).

    ``flip`` flips one ciphertext bit, ``replay`` sends the previous message again first,
    ``drop`` closes the connection instead of sending (the silo vanishes mid-step).
    """

    def __init__(self, connection, action: str, at: int) -> None:
        self.connection, self.action, self.at = connection, action, at
        self.sent = 0
        self.previous = b""

    @property
    def peer(self) -> str:
        return self.connection.peer

    def send(self, data: bytes) -> None:
        self.sent += 1
        if self.sent == self.at:
            if self.action == "flip":
                data = data[:-20] + bytes([data[-20] ^ 1]) + data[-19:]
            elif self.action == "replay":
                self.connection.send(self.previous)
            elif self.action == "drop":
                self.connection.close()
        self.previous = data
        self.connection.send(data)

    def recv(self, timeout=None) -> bytes:
        return self.connection.recv(timeout)

    def close(self) -> None:
        self.connection.close()


def test_unenrolled_silo_is_refused_and_an_enrolled_one_still_trains(keys_dir, tls_dir):
    cfg = split_cfg(train={"max_steps": 1})
    with trunk_server(cfg, keys_dir, tls_dir) as (service, connect_fn):
        _, coordinator = load_silo_keys(keys_dir, "silo-0")
        stranger = IdentityKey.generate()
        with pytest.raises(SplitError, match="enrollment"):
            open_session(connect_fn("stranger"), stranger, coordinator, timeout=10)
        # A silo that pins another coordinator key refuses the real coordinator.
        identity, _ = load_silo_keys(keys_dir, "silo-0")
        with pytest.raises(SplitError, match="does not match the pinned server key"):
            open_session(connect_fn("silo-0"), identity, stranger.public, timeout=10)
        end = silo_end(cfg, open_silo(connect_fn, keys_dir, "silo-0"))
        losses = train_silo(end, cfg, make_stream(cfg, end.half), 1)
    assert math.isfinite(losses[0])
    outcomes = [(r.outcome, r.detail) for r in service.records]
    assert outcomes[0][0] == "refused" and "is not enrolled" in outcomes[0][1]
    assert outcomes[-1] == ("finished", "")


def _run_with_meddler(cfg, keys_dir, tls_dir, action: str, at: int):
    """Train an honest silo-0 next to a silo-1 whose ``at``-th message is meddled with."""
    steps = cfg.train.max_steps
    with trunk_server(cfg, keys_dir, tls_dir) as (service, connect_fn):
        honest = silo_end(cfg, open_silo(connect_fn, keys_dir, "silo-0"))
        identity, coordinator = load_silo_keys(keys_dir, "silo-1")
        wire = Meddler(connect_fn("silo-1"), action, at=at)
        meddled = silo_end(cfg, open_session(wire, identity, coordinator, timeout=30))
        results = {}

        def run_honest():
            results["honest"] = train_silo(honest, cfg, make_stream(cfg, honest.half, 0), steps)

        def run_meddled():
            train_silo(meddled, cfg, make_stream(cfg, meddled.half, 1), steps)

        errors = run_threads(run_honest, run_meddled)
        trunk = {k: v.clone() for k, v in service.engine.trunk_state().items()}
    return errors, results, trunk, {r.silo: r for r in service.records}


@pytest.mark.parametrize(
    "action,error",
    [("flip", "failed authentication"), ("replay", "was already accepted")],
)
@pytest.mark.parametrize("mode", ["sequential", "client-batching"])
def test_bad_frame_ends_only_its_session(action, error, mode, keys_dir, tls_dir):
    cfg = split_cfg(train={"max_steps": 3}, silos=2, server_mode=mode)
    steps = cfg.train.max_steps
    # messages: hello, confirm, join, forward, backward (mid-step 1) ...
    errors, results, trunk, record = _run_with_meddler(cfg, keys_dir, tls_dir, action, 5)
    assert errors[0] is None, errors[0]
    assert isinstance(errors[1], SplitError) and error in str(errors[1])
    assert record["silo-1"].outcome == "rejected" and error in record["silo-1"].detail
    assert record["silo-0"].outcome == "finished" and record["silo-0"].steps == steps
    # No contamination: the trunk and the honest silo's losses are exactly those of a run in
    # which silo-1 simply vanished at that message (its half-done step never reached the trunk).
    _, clean, clean_trunk, _ = _run_with_meddler(cfg, keys_dir, tls_dir, "drop", 5)
    assert results["honest"] == clean["honest"]
    assert all(torch.equal(trunk[k], clean_trunk[k]) for k in clean_trunk)


@pytest.mark.parametrize("mode", ["sequential", "client-batching", "server-hierarchical"])
def test_silo_vanishing_mid_step_leaves_the_others_training(mode, keys_dir, tls_dir):
    cfg = split_cfg(train={"max_steps": 4}, silos=2, server_mode=mode, sync_every=2)
    steps = cfg.train.max_steps
    with trunk_server(cfg, keys_dir, tls_dir) as (service, connect_fn):
        stayer = silo_end(cfg, open_silo(connect_fn, keys_dir, "silo-0"))
        identity, coordinator = load_silo_keys(keys_dir, "silo-1")
        # hello, confirm, join, fwd, bwd, commit (step 1), fwd (step 2) -> gone before backward
        wire = Meddler(connect_fn("silo-1"), "drop", at=8)
        leaver = silo_end(cfg, open_session(wire, identity, coordinator, timeout=30))
        results = {}

        def run_stayer():
            results["stayer"] = train_silo(stayer, cfg, make_stream(cfg, stayer.half, 0), steps)

        def run_leaver():
            train_silo(leaver, cfg, make_stream(cfg, leaver.half, 1), steps)

        errors = run_threads(run_stayer, run_leaver)
        trunk = service.engine.trunk_state()
    assert errors[0] is None, errors[0]
    # the leaver's own training stopped: its connection was closed under it
    assert isinstance(errors[1], ConnectionClosed) and "is closed" in str(errors[1]), errors[1]
    assert len(results["stayer"]) == steps and all(map(math.isfinite, results["stayer"]))
    record = {r.silo: r for r in service.records}
    assert record["silo-1"].outcome == "vanished" and record["silo-1"].steps == 1
    assert record["silo-0"].outcome == "finished" and record["silo-0"].steps == steps
    assert all(torch.isfinite(t).all() for t in trunk.values())


@pytest.mark.slow
def test_killed_silo_process_leaves_the_others_training(keys_dir, tls_dir, tmp_path):
    """SIGKILL a silo process in the middle of training; the silo in this process finishes."""
    import multiprocessing
    import time

    from silotune.split.runner import _silo_process, run_silo

    cfg = split_cfg(train={"max_steps": 8}, silos=2, server_mode="client-batching")
    cfg.split.keys_dir, cfg.split.tls_dir = keys_dir, tls_dir
    with trunk_server(cfg, keys_dir, tls_dir) as (service, _):
        target = service.target
        args = (cfg.model_dump(mode="json"), "silo-1", 1, target, str(tmp_path / "s1"), False, 1)
        victim = multiprocessing.get_context("spawn").Process(target=_silo_process, args=args)
        victim.start()
        summary = {}

        def stay():
            summary.update(run_silo(cfg, "silo-0", tmp_path / "s0", target=target, shard=0,
                                    evaluate_splits=False))  # fmt: skip

        def kill_after_first_step():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if any(r.silo == "silo-1" and r.steps >= 1 for r in service.records):
                    break
                time.sleep(0.01)
            victim.kill()
            victim.join(10)

        errors = run_threads(stay, kill_after_first_step, timeout=300)
    assert errors == [None, None], errors
    assert victim.exitcode == -9
    record = {r.silo: r for r in service.records}
    assert record["silo-1"].outcome == "vanished" and 1 <= record["silo-1"].steps < 8
    assert record["silo-0"].outcome == "finished" and record["silo-0"].steps == 8
    assert summary["steps"] == 8
