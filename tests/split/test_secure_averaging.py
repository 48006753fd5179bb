"""Secure averaging of silo adapters: real TrunkService, tiny-llama adapters, in-process transport.

The coordinator must end up with the example-weighted average (within the fixed-point tolerance)
while every upload it receives is masked; silos that vanish before or during a round are handled
as documented in :mod:`silotune.split.secure_averaging`.
"""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
import torch

from silotune.crypto import box
from silotune.crypto.fixedpoint import FixedPointCodec
from silotune.crypto.masking import MaskingServer
from silotune.secagg import masking_driver, wire
from silotune.split.averaging import weighted_average
from silotune.split.keys import load_enrollment, load_silo_keys
from silotune.split.parts import PartState, build_half
from silotune.split.secure_averaging import (
    MaskingAverager,
    flatten_state,
    unflatten_state,
)
from silotune.split.session import FrameSession, SplitError, open_session
from silotune.split.silo import TrunkLink, make_averager
from silotune.transport.frames import FrameError
from tests.split.conftest import open_silo, run_threads, settings_of, split_cfg, trunk_server

EXAMPLES = [50, 100, 150]
HEADER = 22 + 8  # SecAgg message header, then the vector length, then the uint32 values


@pytest.fixture(scope="module")
def adapter():
    """The head/tail adapter of a tiny-llama silo (LoRA on q and v), names as PEFT has them."""
    half = build_half(split_cfg(), "silo")
    return PartState(half.model, [half.parts.head, half.parts.tail]).get(
        [half.parts.head, half.parts.tail]
    )


def silo_states(adapter, count):
    """``count`` different adapters: the real one plus a per-silo perturbation."""
    gen = torch.Generator().manual_seed(3)
    return [
        {n: t + 0.05 * (i + 1) * torch.randn(t.shape, generator=gen) for n, t in adapter.items()}
        for i in range(count)
    ]


class CloseAfter:
    """A connection that closes itself right after sending its ``at``-th message (1-based)."""

    def __init__(self, connection, at: int) -> None:
        self.connection, self.at, self.sent = connection, at, 0

    @property
    def peer(self) -> str:
        return self.connection.peer

    def send(self, data: bytes) -> None:
        self.connection.send(data)
        self.sent += 1
        if self.sent == self.at:
            self.connection.close()

    def recv(self, timeout=None) -> bytes:
        return self.connection.recv(timeout)

    def close(self) -> None:
        self.connection.close()


def masked_silo(cfg, session: FrameSession, examples: int, keys_dir=None, name=None):
    """A silo link with the config's averager, joined (the averager must exist before ``join``).

    The silo signs with its identity from ``keys_dir`` and checks peers against the enrollment.
    """
    link = TrunkLink(session, timeout=60)
    name = name or session.silo_name
    folder = keys_dir or session.keys_dir
    identity, _ = load_silo_keys(folder, name)
    averager = make_averager(cfg, link, identity, load_enrollment(folder, "test silo"), name)
    link.join(examples, settings_of(cfg))
    return averager


def masked_silos(cfg, connect_fn, keys_dir, count: int):
    """``count`` joined silos silo-0.. with the config's averager."""
    return [
        masked_silo(cfg, open_silo(connect_fn, keys_dir, f"silo-{i}"), EXAMPLES[i])
        for i in range(count)
    ]


def spy_uploads(monkeypatch):
    """Record every masked upload the coordinator's SecAgg server receives."""
    uploads: list[bytes] = []

    class Spy(MaskingServer):
        def receive_masked(self, message: bytes) -> None:
            uploads.append(bytes(message))
            super().receive_masked(message)

    monkeypatch.setattr(masking_driver, "MaskingServer", Spy)
    return uploads


def spy_frames(monkeypatch):
    """Record (silo, kind, tensor names) of every frame a coordinator session receives."""
    seen: list[tuple[str, str, list[str]]] = []
    recv = FrameSession.recv

    def spy(self, timeout=None):
        frame = recv(self, timeout)
        if self.peer_name != "coordinator":  # this is the coordinator's end of a session
            seen.append((self.peer_name, frame.kind, sorted(frame.tensors)))
        return frame

    monkeypatch.setattr(FrameSession, "recv", spy)
    return seen


def average_all(averagers, states, step=2):
    """Run ``average`` on every silo at once; returns (results, errors) by silo index."""
    results = [None] * len(averagers)

    def call(i):
        def run():
            results[i] = averagers[i].average(step, states[i], EXAMPLES[i])

        return run

    errors = run_threads(*(call(i) for i in range(len(averagers))), timeout=120)
    return results, errors


def close_to(result, expected, silos, clip=16.0):
    """Within the fixed-point tolerance of ``silos`` terms (plus float32 rounding)."""
    tol = FixedPointCodec(clip=clip, n_silos=silos, bits=32).sum_tolerance(silos) + 1e-7
    for name, tensor in expected.items():
        diff = float((result[name] - tensor).abs().max())
        assert diff <= tol, (name, diff, tol)
    return tol


def test_secure_average_equals_weighted_average_and_the_coordinator_sees_only_masks(
    adapter, keys_dir, monkeypatch
):
    uploads, frames = spy_uploads(monkeypatch), spy_frames(monkeypatch)
    cfg = split_cfg(silos=3)
    states = silo_states(adapter, 3)
    with trunk_server(cfg, keys_dir) as (service, connect_fn):
        averagers = masked_silos(cfg, connect_fn, keys_dir, 3)
        assert all(isinstance(a, MaskingAverager) for a in averagers)
        results, errors = average_all(averagers, states)
        outcomes = {r.silo: r.outcome for r in service.records}
    assert errors == [None] * 3, errors
    assert outcomes == {f"silo-{i}": "open" for i in range(3)}  # sessions go on, no error
    expected = weighted_average(states, EXAMPLES)
    for result in results:  # every silo gets the same average, within the fixed-point bound
        close_to(result, expected, 3)
        assert all(torch.equal(result[n], results[0][n]) for n in result)
    # What the coordinator received from silos: join, then only secagg stages carrying a byte
    # blob; never a 'sync' frame and never a tensor named like an adapter tensor.
    kinds = {(kind, tuple(names)) for _, kind, names in frames}
    assert kinds == {("join", ()), ("secagg", ())}, kinds  # stage messages travel as data
    # Each masked upload is not the silo's fixed-point vector and looks uniform over uint32;
    # the fixed-point vector itself sits near 0 (top byte 0x00 or 0xFF for small values).
    assert len(uploads) == 3
    codec = FixedPointCodec(clip=16.0, n_silos=3, bits=32)
    total = sum(EXAMPLES)
    plain = {
        i: codec.encode(flatten_state(states[i]) * EXAMPLES[i] / total).astype(np.uint32)
        for i in range(3)
    }
    for upload in uploads:
        (sender,) = struct.unpack_from(">Q", upload, 14)  # SecAgg ids 1..3 by sorted silo name
        values = np.frombuffer(upload[HEADER:], dtype="<u4")
        fixed = plain[sender - 1]
        assert values.shape == fixed.shape
        assert np.mean(values == fixed) < 1e-3
        top = values >> 24
        assert np.mean((top == 0) | (top == 255)) < 0.02  # uniform: about 2/256
        assert np.mean((fixed >> 24 == 0) | (fixed >> 24 == 255)) == 1.0
        assert abs(values.astype(np.float64).mean() / 2**31 - 1) < 0.02


def test_a_silo_gone_between_syncs_leaves_the_round_to_the_others(adapter, keys_dir):
    cfg = split_cfg(silos=3)
    states = silo_states(adapter, 3)
    with trunk_server(cfg, keys_dir) as (service, connect_fn):
        sessions = [open_silo(connect_fn, keys_dir, f"silo-{i}") for i in range(3)]
        averagers = [
            masked_silo(cfg, sessions[i], EXAMPLES[i], keys_dir, f"silo-{i}") for i in range(3)
        ]
        sessions[2].close()  # silo-2 vanishes before the sync
        deadline = time.monotonic() + 10
        while "silo-2" in service.engine.roster.live and time.monotonic() < deadline:
            time.sleep(0.01)
        results, errors = average_all(averagers[:2], states[:2])
    assert errors == [None, None], errors
    close_to(results[0], weighted_average(states[:2], EXAMPLES[:2]), 2)


@pytest.mark.parametrize(
    "gone_after,included",
    [
        # handshake 2, join 3, hello 4, public_key 5, share_bundles 6, masked_vector 7
        (7, True),  # uploaded, then vanished: its self mask is rebuilt, it stays in the average
        (6, False),  # shared keys, never uploaded: its pairwise masks are rebuilt, it is left out
    ],
)
def test_shamir_recovery_when_a_silo_vanishes_mid_round(adapter, keys_dir, gone_after, included):
    cfg = split_cfg(silos=3)
    states = silo_states(adapter, 3)
    with trunk_server(cfg, keys_dir) as (service, connect_fn):
        averagers = masked_silos(cfg, connect_fn, keys_dir, 2)
        identity, coordinator = load_silo_keys(keys_dir, "silo-2")
        wire = CloseAfter(connect_fn("silo-2"), gone_after)
        leaver = masked_silo(
            cfg, open_session(wire, identity, coordinator, 30), EXAMPLES[2], keys_dir, f"silo-{2}"
        )
        results, errors = average_all([*averagers, leaver], states)
    assert errors[:2] == [None, None], errors
    assert isinstance(errors[2], SplitError), errors[2]  # the leaver's own call failed
    count = 3 if included else 2
    expected = weighted_average(states[:count], EXAMPLES[:count])
    close_to(results[0], expected, 3)
    assert {r.silo: r.outcome for r in service.records}["silo-2"] == "vanished"


def test_a_round_below_the_threshold_fails_with_a_clear_error(adapter, keys_dir):
    """Two silos: the threshold is 2, so losing one after its upload stops the round."""
    cfg = split_cfg(silos=2)
    states = silo_states(adapter, 2)
    with trunk_server(cfg, keys_dir) as (service, connect_fn):
        stayer = masked_silo(cfg, open_silo(connect_fn, keys_dir, "silo-0"), EXAMPLES[0])
        identity, coordinator = load_silo_keys(keys_dir, "silo-1")
        wire = CloseAfter(connect_fn("silo-1"), 7)
        leaver = masked_silo(
            cfg, open_session(wire, identity, coordinator, 30), EXAMPLES[1], keys_dir, f"silo-{1}"
        )
        _, errors = average_all([stayer, leaver], states)
    assert isinstance(errors[0], SplitError)
    assert "only 1 silos confirmed the round's view" in str(errors[0]) and "threshold 2" in str(
        errors[0]
    )
    assert {r.silo: r.outcome for r in service.records}["silo-0"] == "failed"


def test_one_silo_keeps_its_adapter_and_sends_nothing(adapter, keys_dir, monkeypatch):
    uploads = spy_uploads(monkeypatch)
    cfg = split_cfg(silos=1)
    with trunk_server(cfg, keys_dir) as (_, connect_fn):
        averager = masked_silo(cfg, open_silo(connect_fn, keys_dir, "silo-0"), 10)
        result = averager.average(1, adapter, 10)
    assert uploads == []
    assert result.keys() == adapter.keys()
    assert all(torch.equal(result[n], adapter[n]) for n in adapter)


def test_a_value_beyond_the_clip_stops_the_round_with_the_config_key(adapter, keys_dir):
    cfg = split_cfg(silos=2, secagg_clip=0.01)
    states = silo_states(adapter, 2)
    with trunk_server(cfg, keys_dir) as (_, connect_fn):
        averagers = masked_silos(cfg, connect_fn, keys_dir, 2)
        _, errors = average_all(averagers, states)
    assert all(isinstance(e, SplitError) for e in errors), errors
    assert any("split.secagg_clip 0.01" in str(e) for e in errors), errors


def test_silos_must_agree_on_how_they_average(keys_dir):
    masked, plain = split_cfg(), split_cfg(secure_averaging="none")  # quorum of 1: no wait
    with trunk_server(masked, keys_dir) as (service, connect_fn):
        first = masked_silo(masked, open_silo(connect_fn, keys_dir, "silo-0"), 10)
        # The other way is refused at join, by the shared settings, before any step.
        with pytest.raises(SplitError, match='split.secure_averaging silo "none", coordinator "m'):
            masked_silo(plain, open_silo(connect_fn, keys_dir, "silo-1"), 10)
        # A silo of a masking job may not send its adapter in clear either.
        with pytest.raises(SplitError, match="a 'sync' frame, but this job averages with 'mask"):
            first.link.sync({"w": torch.ones(3)}, 10)
    outcomes = {r.silo: r.outcome for r in service.records}
    assert outcomes == {"silo-0": "rejected", "silo-1": "refused"}


def test_flat_states_round_trip_and_reject_garbage():
    state = {"b": torch.arange(6.0).view(2, 3), "a": torch.tensor([-1.5])}
    vector = flatten_state(state)
    assert vector.tolist() == [-1.5, 0, 1, 2, 3, 4, 5]
    back = unflatten_state(vector.astype(np.float32), state)
    assert all(torch.equal(back[n], state[n]) for n in state)
    with pytest.raises(FrameError, match="holds 6 values"):
        unflatten_state(np.zeros(6, dtype=np.float32), state)


def test_hierarchical_trunk_replicas_are_averaged_at_a_secure_sync(adapter, keys_dir):
    cfg = split_cfg(silos=2, server_mode="server-hierarchical")
    states = silo_states(adapter, 2)
    with trunk_server(cfg, keys_dir) as (service, connect_fn):
        averagers = masked_silos(cfg, connect_fn, keys_dir, 2)
        engine = service.engine
        deadline = time.monotonic() + 10
        while len(engine.replicas) < 2 and time.monotonic() < deadline:  # joins are processed
            time.sleep(0.01)
        with torch.no_grad():  # make the replicas differ, as after local trunk steps
            for p in engine.replicas["silo-0"].params():
                p.add_(0.1)
        replicas = [engine.state.get([engine.replicas[f"silo-{i}"].part]) for i in range(2)]
        _, errors = average_all(averagers, states)
        after = [engine.state.get([engine.replicas[f"silo-{i}"].part]) for i in range(2)]
    assert errors == [None, None], errors
    expected = weighted_average(replicas, EXAMPLES[:2])
    for state in after:
        assert all(torch.allclose(state[n], expected[n], atol=1e-7) for n in expected)


def _rewrite(message: bytes, stage: str, change) -> bytes:
    reader, payload = wire.unpack(message, stage, "test")
    doc = dict(reader.doc)
    doc.pop("stage")
    change(doc)
    return wire.pack(stage, doc, payload)


@pytest.mark.parametrize("what", ["transport_pk", "mask_pk"])
def test_a_coordinator_that_substitutes_keys_is_detected_before_any_upload(
    adapter, keys_dir, monkeypatch, what
):
    """Issue 10, finding 3: substituted per-round keys let a coordinator rebuild one adapter."""
    uploads = spy_uploads(monkeypatch)
    original = masking_driver.MaskingDriver.messages
    fake = box.public_bytes(box.new_transport_key()).hex()  # the coordinator's own key

    def substituted(self):
        out = original(self)
        if self.stage == "share_keys":
            out = {
                m: _rewrite(msg, "share_keys", lambda d: d["adverts"]["3"].update({what: fake}))
                for m, msg in out.items()
            }
        return out

    monkeypatch.setattr(masking_driver.MaskingDriver, "messages", substituted)
    cfg = split_cfg(silos=3)
    with trunk_server(cfg, keys_dir) as (_, connect_fn):
        averagers = masked_silos(cfg, connect_fn, keys_dir, 3)
        _, errors = average_all(averagers, silo_states(adapter, 3))
    assert not uploads  # no silo sent a masked adapter
    assert "key substitution detected: the keys of silo 3 ('silo-2')" in str(errors[0])
    assert "key substitution detected" in str(errors[1])
    assert "does not carry this silo's own keys unchanged" in str(errors[2])


def test_a_coordinator_that_replays_a_round_is_refused(adapter, keys_dir, monkeypatch):
    """A second masked upload for one round id (e.g. with a smaller roster) is refused."""
    cfg = split_cfg(silos=2)
    states = silo_states(adapter, 2)
    with trunk_server(cfg, keys_dir) as (service, connect_fn):
        averagers = masked_silos(cfg, connect_fn, keys_dir, 2)
        _, errors = average_all(averagers, states)
        assert errors == [None, None]
        service.secure.rounds -= 1  # the coordinator reuses the round id it just completed
        _, errors = average_all(averagers, states, step=4)
    assert all("replays round 1" in str(e) for e in errors)
