"""Tests for the fixed-point codec: round trips, clipping, no wrap at n_silos, tolerance."""

import numpy as np
import pytest

from silotune.crypto import prg
from silotune.crypto.fixedpoint import FixedPointCodec


def _values(n: int, seed_byte: int = 1) -> np.ndarray:
    words = prg.expand(bytes([seed_byte]) * 32, n, label=b"test-values")
    return (words.astype(np.float64) / 2**31 - 1.0).astype(np.float32)  # in [-1, 1)


def test_scale_and_headroom_for_32_bits():
    codec = FixedPointCodec(clip=1.0, n_silos=16, bits=32)
    assert codec.max_q == (2**31 - 1) // 16
    assert codec.max_q * 16 <= 2**31 - 1
    assert codec.sum_tolerance() < 1e-7


def test_round_trip_single_vector_within_half_step():
    codec = FixedPointCodec(clip=1.0, n_silos=4)
    x = _values(1000)
    enc = codec.encode(x)
    assert enc.dtype == np.uint32
    np.testing.assert_allclose(codec.decode_sum(enc), x, atol=0.5 / codec.scale + 1e-7)


def test_sum_of_n_silos_extremes_does_not_wrap():
    codec = FixedPointCodec(clip=1.0, n_silos=8)
    for sign in (1.0, -1.0):
        x = np.full(10, sign * 5.0, dtype=np.float32)  # clipped to +-1, the worst case
        total = np.zeros(10, dtype=np.uint32)
        for _ in range(8):
            total += codec.encode(x)
        np.testing.assert_allclose(codec.decode_sum(total, n_terms=8), sign * 8.0, atol=1e-6)


def test_modular_sum_matches_float_sum_within_tolerance():
    codec = FixedPointCodec(clip=1.0, n_silos=4)
    xs = [_values(4096, seed_byte=k) * 0.25 for k in range(4)]
    total = np.zeros(4096, dtype=np.uint32)
    for x in xs:
        total += codec.encode(x)
    err = np.abs(codec.decode_sum(total, n_terms=4) - np.sum(xs, axis=0, dtype=np.float64))
    assert err.max() <= codec.sum_tolerance(4) + 1e-6


def test_values_outside_clip_saturate():
    codec = FixedPointCodec(clip=0.5, n_silos=2)
    x = np.array([-3.0, -0.5, 0.25, 0.5, 7.0], dtype=np.float32)
    out = codec.decode_sum(codec.encode(x))
    np.testing.assert_allclose(out, [-0.5, -0.5, 0.25, 0.5, 0.5], atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_raise(bad):
    codec = FixedPointCodec()
    with pytest.raises(ValueError, match="finite"):
        codec.encode(np.array([0.0, bad], dtype=np.float32))


def test_more_terms_than_n_silos_raises():
    codec = FixedPointCodec(n_silos=3)
    with pytest.raises(ValueError, match="n_terms must be an int in \\[1, 3\\]"):
        codec.decode_sum(codec.encode(np.zeros(2)), n_terms=4)


def test_narrow_width_lift_is_centred():
    codec = FixedPointCodec(clip=1.0, n_silos=2, bits=22)
    x = np.array([-1.0, -0.3, 0.0, 0.7, 1.0])
    enc = codec.encode(x)
    assert enc.max() < 2**22
    np.testing.assert_array_equal(codec.lift(enc), codec.quantize(x))
    np.testing.assert_allclose(codec.decode_sum(enc), x, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"clip": 0.0}, "clip"),
        ({"clip": float("nan")}, "clip"),
        ({"n_silos": 0}, "n_silos"),
        ({"bits": 7}, "bits"),
        ({"bits": 63}, "bits"),
    ],
)
def test_bad_codec_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FixedPointCodec(**kwargs)


def test_non_numeric_input_raises():
    with pytest.raises(TypeError, match="real numeric"):
        FixedPointCodec().encode(np.array(["a"]))
