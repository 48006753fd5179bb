"""Tests for split-learning frames: round trips, compression, noise and every malformed input."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch

from silotune.transport.frames import (
    MAGIC,
    Frame,
    FrameError,
    FrameLimits,
    add_noise,
    decode_frame,
    encode_frame,
)


def _split(frame: bytes) -> tuple[dict, bytes]:
    """Return (header dict, safetensors payload) of an encoded frame."""
    (header_len,) = struct.unpack_from("<I", frame, 4)
    return json.loads(frame[8 : 8 + header_len]), frame[8 + header_len :]


def _assemble(header: dict, payload: bytes, magic: bytes = MAGIC) -> bytes:
    raw = json.dumps(header).encode()
    return magic + struct.pack("<I", len(raw)) + raw + payload


def _st_split(payload: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", payload)
    return json.loads(payload[8 : 8 + n]), payload[8 + n :]


def _st_assemble(st_header: dict, data: bytes) -> bytes:
    raw = json.dumps(st_header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.fixture
def sample() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "hidden": torch.randn(2, 5, 8, generator=gen),  # (B, T, C)
        "mask_len": torch.tensor([5, 3], dtype=torch.int64),
        "flags": torch.tensor([True, False]),
        "half": torch.randn(3, 4, generator=gen).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
    }


# --------------------------------------------------------------------------- round trips


def test_round_trip_keeps_every_field_and_value(sample: dict[str, torch.Tensor]) -> None:
    data = encode_frame("forward", 17, sample, {"lengths": [5, 3], "train": True}, silo_id="s1")
    frame = decode_frame(data, FrameLimits())
    assert isinstance(frame, Frame)
    assert (frame.kind, frame.step, frame.silo_id, frame.version) == ("forward", 17, "s1", 2)
    assert frame.meta == {"lengths": [5, 3], "train": True}
    assert list(frame.tensors) == list(sample)  # header order is preserved
    for name, tensor in sample.items():
        assert frame.tensors[name].dtype == tensor.dtype
        assert torch.equal(frame.tensors[name], tensor)


def test_opaque_data_travels_after_the_tensors_and_its_length_is_checked(sample) -> None:
    blob = bytes(range(256)) * 3
    data = encode_frame("secagg", 4, sample, {"stage": "x"}, data=blob)
    frame = decode_frame(data)
    assert frame.data == blob and list(frame.tensors) == list(sample)
    assert decode_frame(encode_frame("secagg", 4, {}, None, data=b"\x00")).data == b"\x00"
    with pytest.raises(FrameError, match="safetensors|truncated"):
        decode_frame(data[:-1])  # one byte short: the tensors' bytes no longer add up
    header, payload = _split(data)
    header["data"] = len(payload) + 100
    with pytest.raises(FrameError, match="declares .* bytes of data"):
        decode_frame(_assemble(header, payload))
    header["data"] = -1
    with pytest.raises(FrameError, match="'data' must be a byte count"):
        decode_frame(_assemble(header, payload))


def test_round_trip_of_a_frame_without_tensors() -> None:
    frame = decode_frame(encode_frame("bye", 3, {}, None))
    assert (frame.kind, frame.step, frame.tensors, frame.meta) == ("bye", 3, {}, {})


def test_encode_accepts_non_contiguous_and_grad_tensors() -> None:
    base = torch.randn(4, 6, requires_grad=True)
    frame = decode_frame(encode_frame("backward", 0, {"g": base.t()}))
    assert torch.equal(frame.tensors["g"], base.detach().t())


@pytest.mark.parametrize("wire", ["float16", "bfloat16", torch.float16, torch.bfloat16])
def test_activation_compression_halves_bytes_and_restores_float32(wire: object) -> None:
    hidden = torch.randn(4, 64, 32)
    ids = torch.arange(8)
    plain = encode_frame("forward", 1, {"h": hidden, "ids": ids})
    packed = encode_frame("forward", 1, {"h": hidden, "ids": ids}, activation_dtype=wire)
    assert len(plain) - len(packed) == pytest.approx(hidden.numel() * 2, abs=64)
    frame = decode_frame(packed)
    assert frame.tensors["h"].dtype == torch.float32
    assert torch.equal(frame.tensors["ids"], ids)  # non-float tensors are never converted
    tol = 1e-2 if "bfloat16" in str(wire) else 1e-3
    assert torch.allclose(frame.tensors["h"], hidden, rtol=tol, atol=tol)
    assert not torch.equal(frame.tensors["h"], hidden)  # precision really was reduced
    header, _ = _split(packed)
    assert header["tensors"][0]["wire_dtype"] == str(wire).removeprefix("torch.")


def test_activation_compression_rejects_other_dtypes() -> None:
    with pytest.raises(ValueError, match="activation_dtype"):
        encode_frame("forward", 0, {"h": torch.ones(2)}, activation_dtype="int8")


# --------------------------------------------------------------------------- encode arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "hello"}, "Unknown frame kind"),
        ({"step": -1}, "step"),
        ({"step": True}, "step"),
        ({"tensors": {"x": torch.ones(2, dtype=torch.complex64)}}, "dtype"),
        ({"tensors": {"x": torch.ones(1, 1, 1, 1, 1)}}, "rank"),
        ({"tensors": {"": torch.ones(1)}}, "names"),
        ({"tensors": {"__metadata__": torch.ones(1)}}, "reserved"),
        ({"meta": {"x": float("nan")}}, "JSON"),
        ({"meta": {"x": object()}}, "JSON"),
        ({"meta": {"blob": "a" * 70_000}}, "header is"),
    ],
)
def test_encode_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"kind": "forward", "step": 0, "tensors": {"x": torch.ones(2)}, "meta": {}}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        encode_frame(args["kind"], args["step"], args["tensors"], args["meta"])


# --------------------------------------------------------------------------- malformed frames


@pytest.fixture
def good() -> bytes:
    return encode_frame(
        "forward", 2, {"h": torch.ones(2, 3), "n": torch.tensor([1, 2])}, {"k": 1}, silo_id="a"
    )


def test_every_truncation_is_rejected(good: bytes) -> None:
    for cut in range(len(good)):
        with pytest.raises(FrameError):
            decode_frame(good[:cut])


def test_truncated_messages_name_the_problem(good: bytes) -> None:
    with pytest.raises(FrameError, match="truncated"):
        decode_frame(good[:5])
    with pytest.raises(FrameError, match="truncated"):
        decode_frame(good[:-1])


def test_wrong_magic_is_rejected(good: bytes) -> None:
    with pytest.raises(FrameError, match="magic"):
        decode_frame(b"XXXX" + good[4:])


def test_unsupported_version_is_rejected(good: bytes) -> None:
    header, payload = _split(good)
    header["version"] = 1
    with pytest.raises(FrameError, match="version 1 is not supported"):
        decode_frame(_assemble(header, payload))


def test_header_length_over_limit_is_rejected_before_parsing(good: bytes) -> None:
    with pytest.raises(FrameError, match="header declares"):
        decode_frame(MAGIC + struct.pack("<I", 2**31) + b"{}")


@pytest.mark.parametrize(
    "raw", [b"\xff\xfe", b"{not json", b"[1, 2]", b'{"a": NaN}', b"[" * 50_000 + b"]" * 50_000]
)
def test_header_that_is_not_a_json_object_is_rejected(raw: bytes) -> None:
    with pytest.raises(FrameError, match="header"):
        decode_frame(MAGIC + struct.pack("<I", len(raw)) + raw)


def test_duplicate_json_keys_are_rejected(good: bytes) -> None:
    header, payload = _split(good)
    raw = json.dumps(header).encode()
    raw = raw[:-1] + b', "kind": "bye"}'
    with pytest.raises(FrameError, match="repeats the key 'kind'"):
        decode_frame(MAGIC + struct.pack("<I", len(raw)) + raw + payload)


def test_unknown_kind_is_rejected(good: bytes) -> None:
    header, payload = _split(good)
    header["kind"] = "exec"
    with pytest.raises(FrameError, match="Unknown frame kind 'exec'"):
        decode_frame(_assemble(header, payload))


def test_kind_outside_the_receivers_allowed_set_is_rejected(good: bytes) -> None:
    with pytest.raises(FrameError, match="Unknown frame kind 'forward'"):
        decode_frame(good, FrameLimits(allowed_kinds=frozenset({"backward"})))


def test_missing_or_extra_header_fields_are_rejected(good: bytes) -> None:
    header, payload = _split(good)
    del header["silo"]
    with pytest.raises(FrameError, match="expected exactly"):
        decode_frame(_assemble(header, payload))
    header, payload = _split(good)
    header["cmd"] = "rm"
    with pytest.raises(FrameError, match="expected exactly"):
        decode_frame(_assemble(header, payload))


def test_unknown_dtype_is_rejected(good: bytes) -> None:
    header, payload = _split(good)
    header["tensors"][0]["dtype"] = header["tensors"][0]["wire_dtype"] = "float64"
    with pytest.raises(FrameError, match="float64"):
        decode_frame(_assemble(header, payload))


def test_compression_of_a_non_float32_tensor_is_rejected(good: bytes) -> None:
    header, payload = _split(good)
    header["tensors"][1]["wire_dtype"] = "float16"  # the int64 tensor
    with pytest.raises(FrameError, match="only float32 may be sent"):
        decode_frame(_assemble(header, payload))


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ([2**40, 2**40], "elements"),
        ([2, -3], "non-negative"),
        ([1, 1, 1, 1, 1], "at most 4"),
        ([2.0, 3], "non-negative ints"),
        ("2x3", "shape must be a list"),
    ],
)
def test_insane_shapes_are_rejected_before_allocation(
    good: bytes, shape: object, match: str
) -> None:
    header, payload = _split(good)
    header["tensors"][0]["shape"] = shape
    with pytest.raises(FrameError, match=match):
        decode_frame(_assemble(header, payload))


def test_total_bytes_over_frame_limit_are_rejected(good: bytes) -> None:
    header, payload = _split(good)
    header["tensors"][0]["shape"] = [1000, 1000]  # 4 MB declared, under max_numel
    limits = FrameLimits(max_frame_bytes=1_000_000)
    with pytest.raises(FrameError, match="total more than 1000000 bytes"):
        decode_frame(_assemble(header, payload), limits)


def test_frame_larger_than_limit_is_rejected_first(good: bytes) -> None:
    with pytest.raises(FrameError, match="limit is 100 bytes"):
        decode_frame(good, FrameLimits(max_frame_bytes=100))


def test_too_many_tensors_is_rejected() -> None:
    data = encode_frame("forward", 0, {f"t{i}": torch.ones(1) for i in range(5)})
    with pytest.raises(FrameError, match="5 tensors; the limit is 4"):
        decode_frame(data, FrameLimits(max_tensors=4))


def test_payload_dtype_disagreeing_with_header_is_rejected(good: bytes) -> None:
    header, _ = _split(good)
    # Same byte count (float32 vs int32), so only the dtype check can catch it.
    payload = safetensors.torch.save(
        {"h": torch.ones(2, 3, dtype=torch.int32), "n": torch.tensor([1, 2])}
    )
    with pytest.raises(FrameError, match="'I32' in the payload but the frame header declares"):
        decode_frame(_assemble(header, payload))


def test_payload_shape_disagreeing_with_header_is_rejected(good: bytes) -> None:
    header, _ = _split(good)
    payload = safetensors.torch.save({"h": torch.ones(3, 2), "n": torch.tensor([1, 2])})
    with pytest.raises(FrameError, match="shape"):
        decode_frame(_assemble(header, payload))


def test_payload_with_other_tensor_names_is_rejected(good: bytes) -> None:
    header, _ = _split(good)
    payload = safetensors.torch.save({"h": torch.ones(2, 3), "evil": torch.tensor([1, 2])})
    with pytest.raises(FrameError, match="Payload holds tensors"):
        decode_frame(_assemble(header, payload))


def test_overlapping_offsets_are_rejected(good: bytes) -> None:
    header, payload = _split(good)
    st_header, data = _st_split(payload)
    st_header["h"]["data_offsets"] = [0, 24]
    st_header["n"]["data_offsets"] = [8, 24]
    with pytest.raises(FrameError, match="must not overlap"):
        decode_frame(_assemble(header, _st_assemble(st_header, data)))


def test_offsets_pointing_past_the_payload_are_rejected(good: bytes) -> None:
    header, payload = _split(good)
    st_header, data = _st_split(payload)
    span = st_header["h"]["data_offsets"]
    st_header["h"]["data_offsets"] = [span[0] + 10**6, span[1] + 10**6]
    with pytest.raises(FrameError, match="data starts at byte 10000"):
        decode_frame(_assemble(header, _st_assemble(st_header, data)))


def test_safetensors_header_length_lying_is_rejected(good: bytes) -> None:
    header, payload = _split(good)
    with pytest.raises(FrameError, match="Safetensors header declares"):
        decode_frame(_assemble(header, struct.pack("<Q", 2**60) + payload[8:]))


def test_trailing_garbage_is_rejected(good: bytes) -> None:
    with pytest.raises(FrameError, match="trailing garbage"):
        decode_frame(good + b"\x00" * 4)


def test_decoded_tensors_do_not_alias_the_input_buffer(good: bytes) -> None:
    buffer = bytearray(good)
    frame = decode_frame(buffer)
    before = frame.tensors["h"].clone()
    buffer[-40:] = b"\xff" * 40
    assert torch.equal(frame.tensors["h"], before)


# --------------------------------------------------------------------------- noise


def test_noise_has_requested_scale_and_is_reproducible() -> None:
    x = torch.zeros(200_000)
    a = add_noise(x, 0.5, torch.Generator().manual_seed(1))
    b = add_noise(x, 0.5, torch.Generator().manual_seed(1))
    c = add_noise(x, 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.std().item() == pytest.approx(0.5, rel=0.02)
    assert abs(a.mean().item()) < 0.01


def test_noise_keeps_dtype_and_passes_gradients_through() -> None:
    x = torch.randn(3, 4, dtype=torch.bfloat16, requires_grad=True)
    y = add_noise(x, 0.1)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    y.float().sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_zero_noise_is_identity() -> None:
    x = torch.randn(5)
    assert add_noise(x, 0.0) is x


@pytest.mark.parametrize("sigma", [-0.1, float("nan"), float("inf"), "0.1"])
def test_bad_sigma_is_rejected(sigma: object) -> None:
    with pytest.raises(ValueError, match="sigma"):
        add_noise(torch.ones(2), sigma)  # type: ignore[arg-type]


def test_noise_needs_a_float_tensor() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        add_noise(torch.ones(2, dtype=torch.int64), 0.1)


# --------------------------------------------------------------------------- over a transport


def test_frames_cross_a_grpc_stream_intact() -> None:
    from silotune.transport.base import Connection
    from silotune.transport.grpc_stream import GrpcStreamServer, connect

    def trunk(conn: Connection) -> None:
        frame = decode_frame(conn.recv(timeout=10))
        grad = frame.tensors["hidden"] * 2  # stands in for the trunk's backward pass
        conn.send(encode_frame("backward", frame.step, {"grad": grad}, silo_id=frame.silo_id))

    hidden = torch.randn(4, 128, 512)  # (B, T, C): 1 MiB of float32, several gRPC chunks
    with GrpcStreamServer(trunk, insecure=True, chunk_bytes=256 * 1024) as server:
        with connect(server.target, insecure=True, chunk_bytes=256 * 1024) as silo:
            silo.send(
                encode_frame("forward", 5, {"hidden": hidden}, {"lengths": [128] * 4}, silo_id="s")
            )
            reply = decode_frame(
                silo.recv(timeout=10), FrameLimits(allowed_kinds=frozenset({"backward"}))
            )
    assert (reply.kind, reply.step, reply.silo_id) == ("backward", 5, "s")
    assert torch.equal(reply.tensors["grad"], hidden * 2)
