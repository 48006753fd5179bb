"""The trunk in the coordinator's simulated enclave: attestation, ciphertext-only relay, parity."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time

import pytest
import torch
from safetensors.torch import load, load_file

from silotune.crypto.identity import IdentityKey
from silotune.dispatch import run_job
from silotune.enclave.base import AttestationError
from silotune.enclave.platform import platform_secret, write_platform_key
from silotune.enclave.sealing import unseal
from silotune.split import runner
from silotune.split.attest import attest_trunk, trunk_policy
from silotune.split.enclave_trunk import SEALED_TRUNK, EnclaveTrunk
from silotune.split.keys import load_coordinator_keys, load_silo_identity
from silotune.split.session import SplitError, open_session
from silotune.split.trunk_app import SEAL_LABEL
from silotune.transport import InProcessServer
from silotune.transport.frames import decode_frame
from silotune.transport.inprocess import inprocess_pair
from tests.split.conftest import (
    make_stream,
    open_silo,
    run_threads,
    silo_end,
    split_cfg,
    train_silo,
    trunk_server,
)

STEPS = 2


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    private, public = write_platform_key(tmp_path_factory.mktemp("platform"))
    return IdentityKey.load(private), public


@pytest.fixture(scope="module")
def enclave(keys_dir, platform):
    """A trunk enclave for one silo behind an in-process server; every relayed message is kept."""
    cfg = split_cfg(silos=1, trunk_in_enclave=True, secure_averaging="none")
    relayed: list[tuple[str, bytes]] = []
    _, enrollment = load_coordinator_keys(keys_dir)
    trunk = EnclaveTrunk.start(
        cfg, enrollment, platform[0], tap=lambda d, m: relayed.append((d, m))
    )
    server = InProcessServer(trunk.handle)
    server.start()
    yield cfg, trunk, server, relayed
    server.stop(0.5)
    trunk.close()


def _silo_cfg(cfg, keys_dir, platform, **train):
    silo = cfg.model_copy(deep=True)
    silo.split.keys_dir, silo.enclave.platform_key = keys_dir, platform[1]
    for key, value in train.items():
        setattr(silo.train, key, value)
    return silo


def _record_plaintext(session, plain):
    channel = session.channel
    seal, open_ = channel.seal, channel.open

    def recording_seal(data):
        plain.append(data)
        return seal(data)

    def recording_open(data):
        opened = open_(data)
        plain.append(opened)
        return opened

    channel.seal, channel.open = recording_seal, recording_open


def test_silo_trains_through_a_relay_that_sees_only_ciphertext_and_matches_the_plain_trunk(
    enclave, keys_dir, platform
):
    cfg, trunk, server, relayed = enclave
    silo_cfg = _silo_cfg(cfg, keys_dir, platform)
    connection = server.connect("silo-0")
    coordinator = attest_trunk(connection, trunk_policy(silo_cfg), 30)
    assert coordinator == trunk.enclave.identity
    session = open_session(connection, load_silo_identity(keys_dir, "silo-0"), coordinator)
    plain: list[bytes] = []
    _record_plaintext(session, plain)
    end = silo_end(cfg, session)
    losses = train_silo(end, cfg, make_stream(cfg, end.half), STEPS)
    session.close()

    # The host's relay carried the whole session, and none of its plaintext.
    forwards = [decode_frame(p) for p in plain if decode_frame(p).kind == "forward"]
    hidden = forwards[0].tensors["hidden"].numpy().tobytes()
    assert len(hidden) >= 4096
    secrets = [hidden[i : i + 32] for i in range(0, 4096, 512)] + [b"STF1", b'"kind"']
    assert all(any(secret in p for p in plain) for secret in secrets)  # they were on the wire
    to_enclave = b"".join(m for d, m in relayed if d == "to_enclave")
    to_silo = b"".join(m for d, m in relayed if d == "to_silo")
    assert len(to_enclave) > sum(len(p) for p in plain[: len(forwards)])
    for secret in secrets:
        assert secret not in to_enclave and secret not in to_silo
    trunk.refresh()
    assert trunk.commits == STEPS
    assert [r.outcome for r in trunk.records] == ["finished"]

    # Parity: the same job with the trunk in this process gives the same losses and adapters.
    plain_cfg = cfg.model_copy(deep=True)
    plain_cfg.split.trunk_in_enclave = False
    with trunk_server(plain_cfg, keys_dir) as (_, connect_fn):
        reference = silo_end(plain_cfg, open_silo(connect_fn, keys_dir, "silo-0"))
        reference_losses = train_silo(
            reference, plain_cfg, make_stream(plain_cfg, reference.half), STEPS
        )
    assert losses == pytest.approx(reference_losses, abs=1e-5)
    for name, tensor in end.adapter().items():
        torch.testing.assert_close(tensor, reference.adapter()[name], atol=1e-5, rtol=0)


def test_an_enclave_with_another_measurement_is_refused(enclave, keys_dir, platform):
    cfg, _, server, _ = enclave
    other = _silo_cfg(cfg, keys_dir, platform, lr=cfg.train.lr * 2)  # another trunk config
    with pytest.raises(AttestationError, match="not in the allow-list"):
        attest_trunk(server.connect("silo-0"), trunk_policy(other), 30)
    listed = _silo_cfg(cfg, keys_dir, platform)
    listed.enclave.allowed_measurements = ["ab" * 32]
    with pytest.raises(AttestationError, match="not in the allow-list"):
        attest_trunk(server.connect("silo-0"), trunk_policy(listed), 30)


def test_a_replayed_quote_is_refused(enclave, keys_dir, platform):
    cfg, trunk, _, _ = enclave
    old = trunk.enclave.attest(os.urandom(32)).to_bytes()  # a genuine quote, recorded earlier
    silo, host = inprocess_pair(("silo", "malicious host"))

    def replay():
        host.recv(10)
        host.send(old)

    thread = threading.Thread(target=replay, daemon=True)
    thread.start()
    with pytest.raises(AttestationError, match="replayed"):
        attest_trunk(silo, trunk_policy(_silo_cfg(cfg, keys_dir, platform)), 10)
    thread.join(10)


def test_another_platform_key_is_refused(enclave, keys_dir, tmp_path):
    cfg, _, server, _ = enclave
    _, stranger = write_platform_key(tmp_path / "other-platform")
    silo = _silo_cfg(cfg, keys_dir, (None, stranger))
    with pytest.raises(AttestationError, match="signature does not verify"):
        attest_trunk(server.connect("silo-0"), trunk_policy(silo), 30)


def test_a_silo_that_skips_attestation_gets_no_session(enclave, keys_dir):
    _, _, server, _ = enclave
    with pytest.raises(SplitError, match="closed the connection during the handshake"):
        open_silo(server.connect, keys_dir, "silo-0")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(address: str, seconds: float) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {address} after {seconds} s")


@pytest.mark.slow
def test_serve_and_join_keep_the_trunk_adapter_only_sealed(keys_dir, tls_dir, platform, tmp_path):
    private, public = platform[0], platform[1]
    key_file = public.parent / "platform.key"
    common = {
        "address": f"127.0.0.1:{_free_port()}",
        "keys_dir": keys_dir,
        "tls_dir": tls_dir,
        "trunk_in_enclave": True,
        "secure_averaging": "none",
    }
    coordinator = split_cfg(**common)
    coordinator.output_dir, coordinator.enclave.platform_key = tmp_path / "coordinator", key_file
    silo = split_cfg(**common)
    silo.output_dir, silo.enclave.platform_key = tmp_path / "silo", public
    results = {}

    def join_when_listening():  # the server listens only once the enclave is up
        _wait_for_port(common["address"], 120)
        results["silo"] = runner.join(silo, "silo-0")

    errors = run_threads(
        lambda: results.setdefault("coordinator", runner.serve(coordinator)),
        join_when_listening,
        timeout=300,
    )
    assert errors == [None, None], errors
    summary = results["coordinator"]
    assert summary["trunk_steps"] == STEPS and summary["enclave"]["backend"] == "simulated"
    assert not (tmp_path / "coordinator" / "trunk_adapter.safetensors").exists()
    blob = (tmp_path / "coordinator" / "sealed" / SEALED_TRUNK).read_bytes()
    measurement = bytes.fromhex(summary["enclave"]["measurement"])
    trunk = load(unseal(platform_secret(private), measurement, blob, SEAL_LABEL))
    adapter = load_file(tmp_path / "silo" / "adapter" / "adapter_model.safetensors")
    assert trunk and trunk.keys() < adapter.keys()
    for name, tensor in trunk.items():
        assert torch.equal(adapter[name], tensor), name


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["lora", "prefix", "spf"])
def test_train_with_the_trunk_in_the_enclave_matches_train_without(tmp_path, adapter):
    # With a P-tuning v2 prefix the trunk layers' prefix rows live with the trunk: in the enclave;
    # with SPF + LoRA the trunk blocks' SPF rows do (the paper's split scheme).
    losses = {}
    for in_enclave in (False, True):
        cfg = split_cfg(train={"max_steps": 3}, silos=1, trunk_in_enclave=in_enclave)
        cfg.adapter.type = "lora" if adapter == "spf" else adapter
        cfg.adapter.spf.enabled = adapter == "spf"
        cfg.output_dir = tmp_path / f"enclave-{in_enclave}"
        summary = run_job(cfg, progress=False)
        assert summary["split"]["trunk_steps"] == 3
        lines = (cfg.output_dir / "metrics.jsonl").read_text().splitlines()
        losses[in_enclave] = [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]
    assert summary["split"]["enclave"]["backend"] == "simulated"
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    if adapter == "spf":  # the trunk's SPF deltas came out of the enclave, equal to the plain run's
        plain, enclave = (
            load_file(tmp_path / f"enclave-{e}" / "adapter" / "spf_deltas.safetensors")
            for e in (False, True)
        )
        assert plain.keys() == enclave.keys() and len(plain) == 2 * 5 * 6
        for key, tensor in plain.items():
            torch.testing.assert_close(enclave[key], tensor, atol=1e-5, rtol=0)


def test_a_dead_trunk_enclave_is_one_clear_error_not_a_hang(keys_dir, platform):
    cfg = split_cfg(silos=1, trunk_in_enclave=True)
    _, enrollment = load_coordinator_keys(keys_dir)
    trunk = EnclaveTrunk.start(cfg, enrollment, platform[0])
    try:
        server = InProcessServer(trunk.handle)
        server.start()
        connection = server.connect("silo-0")
        trunk.enclave._process.kill()
        assert trunk.finished.wait(30)
        assert "exited" in (trunk.error or "")
        with pytest.raises(SplitError, match="exited"):
            trunk.check()
        with pytest.raises(AttestationError, match="did not answer"):
            attest_trunk(connection, trunk_policy(_silo_cfg(cfg, keys_dir, platform)), 10)
        server.stop(0.5)
    finally:
        trunk.close()
