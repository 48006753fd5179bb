"""The simulated backend: a separate process that measures itself, attests, seals, calls and relays."""

from __future__ import annotations

import os

import pytest
import torch

from silotune.crypto.identity import IdentityKey
from silotune.enclave.base import AttestationError, AttestationPolicy, EnclaveError, verify_quote
from silotune.enclave.ipc import take_bytes
from silotune.enclave.measure import measure
from silotune.enclave.platform import write_platform_key
from silotune.enclave.simulated import SimulatedEnclave
from silotune.transport.base import ConnectionClosed

CONFIG = {"purpose": "test", "n": 1}


@pytest.fixture(scope="module")
def platform() -> IdentityKey:
    return IdentityKey.generate()


@pytest.fixture(scope="module")
def enclave(platform):
    with SimulatedEnclave.start("selftest", CONFIG, platform, start_timeout=120) as running:
        yield running


def test_runs_in_another_process_with_the_measurement_of_its_code_and_config(enclave):
    assert enclave.measurement == measure("selftest", CONFIG)
    meta, _ = enclave.call("info", {}, {})
    assert meta["measurement"] == enclave.measurement.hex()
    assert meta["identity"] == enclave.identity.hex()
    assert enclave._process.pid != os.getpid()


def test_quote_verifies_and_carries_the_enclave_identity(enclave, platform):
    nonce = os.urandom(32)
    policy = AttestationPolicy(platform.public, frozenset({enclave.measurement}))
    quote = verify_quote(enclave.attest(nonce), policy, nonce)
    assert quote.report_data == enclave.identity.public_bytes()
    with pytest.raises(AttestationError, match="replayed"):
        verify_quote(quote, policy, os.urandom(32))


def test_call_carries_tensors_and_serves_ocalls(enclave):
    x = torch.randn(3, 4)
    meta, out = enclave.call("echo", {"scale": 2.0}, {"x": x})
    assert meta == {"n": 1} and torch.equal(out["x"], 2 * x)

    def host(method, meta, tensors):
        assert method == "double"
        return {}, {"x": tensors["x"] * 2}

    _, out = enclave.call("ocall", {}, {"x": x}, ocall=host)
    assert torch.allclose(out["x"], 2 * x + 1)


def test_errors_in_the_app_or_the_ocall_reach_the_host_as_one_error(enclave):
    with pytest.raises(EnclaveError, match="self-test failure requested: because"):
        enclave.call("fail", {"why": "because"}, {})
    with pytest.raises(EnclaveError, match="has no handler"):
        enclave.call("ocall", {}, {"x": torch.ones(1)})

    def broken(method, meta, tensors):
        raise ValueError("host side broke")

    with pytest.raises(EnclaveError, match="host side broke"):
        enclave.call("ocall", {}, {"x": torch.ones(1)}, ocall=broken)
    assert enclave.call("echo", {}, {})[0] == {"n": 0}  # the enclave goes on


def test_sealed_data_opens_only_in_an_enclave_with_the_same_measurement(enclave, platform):
    data = b"trunk adapter state" * 3

    def seal_call(target, method, blob):
        meta, out = target.call(method, {"label": "x", "length": len(blob)}, {"data": blob})
        return take_bytes(out, "data")

    blob = seal_call(enclave, "seal", data)
    assert data not in blob
    assert seal_call(enclave, "unseal", blob) == data
    with SimulatedEnclave.start("selftest", {**CONFIG, "n": 2}, platform) as other:
        assert other.measurement != enclave.measurement
        with pytest.raises(EnclaveError, match="another enclave measurement"):
            seal_call(other, "unseal", blob)


def test_relayed_connections_carry_bytes_both_ways(enclave):
    first, second = enclave.open_connection("a"), enclave.open_connection("b")
    first.send(b"abc")
    second.send(b"xyz")
    assert first.recv(10) == b"cba" and second.recv(10) == b"zyx"
    first.close()
    second.send(b"12")
    assert second.recv(10) == b"21"
    second.close()


def test_a_dead_enclave_fails_calls_and_connections_instead_of_hanging(platform, tmp_path):
    private, _ = write_platform_key(tmp_path / "platform")
    running = SimulatedEnclave.start("selftest", CONFIG, private)
    connection = running.open_connection("c")
    running._process.kill()
    with pytest.raises(ConnectionClosed):
        connection.recv(30)
    with pytest.raises(EnclaveError, match="exited"):
        running.call("echo", {}, {})
    running.close()


def test_unknown_app_and_failing_start_are_clear_errors(platform):
    with pytest.raises(EnclaveError, match="unknown enclave app 'nope'"):
        SimulatedEnclave.start("nope", {}, platform)
    with pytest.raises(EnclaveError, match="could not start"):
        SimulatedEnclave.start("trunk", {"job": {"model": {"name": "no-such-model"}}}, platform)


def test_call_frames_carry_bytes_in_the_data_section_and_check_their_lengths():
    import json as _json
    import struct as _struct

    import torch as _torch

    from silotune.enclave.ipc import decode_call, encode_call
    from silotune.errors import FrameError

    blob = bytes(range(7))
    body = encode_call("seal", {"label": "x"}, {"data": blob, "t": _torch.ones(2)})
    method, meta, values = decode_call(body)
    assert (method, meta, values["data"]) == ("seal", {"label": "x"}, blob)
    assert _torch.equal(values["t"], _torch.ones(2))  # type: ignore[arg-type]
    # A frame whose blob list does not add up to its data section is refused.
    (size,) = _struct.unpack_from("<I", body, 4)
    header = _json.loads(body[8 : 8 + size])
    header["meta"]["blobs"] = [["data", 3]]
    raw = _json.dumps(header).encode()
    with pytest.raises(FrameError, match="do not add up"):
        decode_call(body[:4] + _struct.pack("<I", len(raw)) + raw + body[8 + size :])
