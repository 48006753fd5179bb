"""Tests for homomorphic aggregation: public-only coordinator, weighted sums, bad input."""

import numpy as np
import pytest
import tenseal as ts

from silotune.crypto import he, prg
from silotune.crypto.exceptions import AuthenticationError, CryptoError, KeyMaterialError

LENGTH = 9001  # odd, and more than one ciphertext (4096 slots = 8192 values each)


@pytest.fixture(scope="module")
def keys():
    leader = he.HeKeys.generate()
    return {
        "leader": leader,
        "secret": leader.serialize_secret(),
        "public": leader.serialize_public(),
    }


def _update(k: int, length: int = LENGTH) -> np.ndarray:
    words = prg.expand(bytes([k + 1]) * 32, length, label=b"test-ckks")
    return ((words.astype(np.float64) / 2**31 - 1.0) * 0.99).astype(np.float32)


def test_coordinator_context_has_no_secret_key(keys):
    public = he.HeKeys.load(keys["public"])
    assert not public.is_private
    assert not public.context.is_private()
    assert not public.context.has_secret_key()
    ct = he.encrypt_update(public, _update(0), 1.0)  # public keys can encrypt ...
    agg = he.aggregate(keys["public"], [ct])
    with pytest.raises(KeyMaterialError, match="needs the HE secret key"):
        he.decrypt_aggregate(public, agg, LENGTH)  # ... but never decrypt
    vec = ts.bfv_vector_from(public.context, he._unframe(public, agg)[2][0])
    with pytest.raises(ValueError, match="secret_key"):
        vec.decrypt()  # TenSEAL itself refuses too


def test_coordinator_refuses_secret_context(keys):
    ct = he.encrypt_update(keys["leader"], _update(0), 1.0)
    with pytest.raises(KeyMaterialError, match="must not hold the HE secret key"):
        he.aggregate(keys["secret"], [ct])


def test_secret_keys_round_trip_to_other_silos(keys):
    silo = he.HeKeys.load(keys["secret"])
    assert silo.is_private and silo.key_id == keys["leader"].key_id
    assert silo.params == keys["leader"].params
    with pytest.raises(KeyMaterialError, match="public-only"):
        he.HeKeys.load(keys["public"]).serialize_secret()


def test_aggregate_equals_weighted_plain_sum(keys):
    weights = [0.1, 0.2, 0.3, 0.4]
    silos = [he.HeKeys.load(keys["secret"]) for _ in weights]
    xs = [_update(k) for k in range(4)]
    cts = [he.encrypt_update(s, x, w) for s, x, w in zip(silos, xs, weights, strict=True)]
    agg = he.aggregate(keys["public"], cts)
    out = he.decrypt_aggregate(silos[0], agg, LENGTH)
    expected = sum(x.astype(np.float64) * w for x, w in zip(xs, weights, strict=True))
    assert out.dtype == np.float32 and out.shape == (LENGTH,)
    err = np.abs(out - expected).max()
    assert err <= keys["leader"].params.codec.sum_tolerance(4) + 1e-6
    assert err < 1e-4


def test_values_beyond_clip_saturate(keys):
    x = np.array([-5.0, -1.0, 0.5, 3.0], dtype=np.float32)
    agg = he.aggregate(keys["public"], [he.encrypt_update(keys["leader"], x, 1.0)])
    out = he.decrypt_aggregate(keys["leader"], agg, 4)
    np.testing.assert_allclose(out, [-1.0, -1.0, 0.5, 1.0], atol=1e-5)


def test_sum_of_max_silos_extremes_does_not_wrap(keys):
    params = keys["leader"].params
    x = np.array([1.0, -1.0, -1.0, 1.0, 1.0], dtype=np.float32)
    ct = he.encrypt_update(keys["leader"], x, 1.0)
    agg = he.aggregate(keys["public"], [ct] * params.max_silos)
    out = he.decrypt_aggregate(keys["leader"], agg, 5)
    np.testing.assert_allclose(out, x * params.max_silos, atol=1e-4)
    with pytest.raises(ValueError, match="max_silos=16"):
        he.aggregate(keys["public"], [ct] * (params.max_silos + 1))


def test_tampered_ciphertext_raises(keys):
    x = _update(2)
    ct = he.encrypt_update(keys["leader"], x, 1.0, compress=False)
    agg = bytearray(he.aggregate(keys["public"], [ct, ct], compress=False))
    agg[len(agg) // 2] ^= 0x04  # inside the coefficients of the first ciphertext
    with pytest.raises(AuthenticationError, match="tampered or corrupted"):
        he.decrypt_aggregate(keys["leader"], bytes(agg), LENGTH)


def test_tampered_compressed_ciphertext_raises(keys):
    ct = he.encrypt_update(keys["leader"], _update(2), 1.0)
    agg = he.aggregate(keys["public"], [ct])
    flipped = bytearray(agg)
    flipped[len(agg) // 2] ^= 0x04
    with pytest.raises(CryptoError, match="does not decompress|tampered"):
        he.decrypt_aggregate(keys["leader"], bytes(flipped), LENGTH)
    with pytest.raises(CryptoError, match="truncated"):
        he.decrypt_aggregate(keys["leader"], agg[:-50], LENGTH)


def test_compressed_and_plain_framing_decrypt_alike(keys):
    n = 4 * 8192
    x = _update(4, n)
    packed = he.encrypt_update(keys["leader"], x, 0.5)
    plain = he.encrypt_update(keys["leader"], x, 0.5, compress=False)
    assert len(packed) / n < 8.0 < len(plain) / n < 8.05
    for ct in (packed, plain):
        out = he.decrypt_aggregate(keys["leader"], he.aggregate(keys["public"], [ct]), n)
        np.testing.assert_allclose(out, x * 0.5, atol=1e-5)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b[:20], "truncated"),
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:-100], "truncated"),
        (lambda b: b + b"\x00", "trailing bytes"),
        (lambda b: b[:43] + b"\xff" * 200 + b[243:], "not a valid BFV vector"),
        (lambda b: b[:4] + b"\x01\x02" + b[6:], "bad magic or version"),
    ],
)
def test_garbage_ciphertext_bytes_raise(keys, mutate, match):
    ct = he.encrypt_update(keys["leader"], _update(3), 1.0, compress=False)
    with pytest.raises(CryptoError, match=match):
        he.aggregate(keys["public"], [mutate(ct)])


def test_ciphertext_under_other_keys_raises(keys):
    other = he.HeKeys.generate()
    ct = he.encrypt_update(other, _update(0, 10), 1.0)
    with pytest.raises(KeyMaterialError, match="other keys"):
        he.aggregate(keys["public"], [ct])


def test_mismatched_lengths_raise(keys):
    a = he.encrypt_update(keys["leader"], _update(0, 100), 1.0)
    b = he.encrypt_update(keys["leader"], _update(0, 101), 1.0)
    with pytest.raises(ValueError, match="different lengths: 101 and 100"):
        he.aggregate(keys["public"], [a, b])
    agg = he.aggregate(keys["public"], [a])
    with pytest.raises(ValueError, match="holds 100 values, expected length 99"):
        he.decrypt_aggregate(keys["leader"], agg, 99)


def test_garbage_key_bytes_raise(keys):
    with pytest.raises(KeyMaterialError, match="truncated"):
        he.HeKeys.load(b"STHK")
    with pytest.raises(KeyMaterialError, match="bad magic"):
        he.HeKeys.load(b"XXXX" + keys["public"][4:])
    head = keys["public"][: len(keys["public"]) - 1000]
    with pytest.raises(KeyMaterialError, match="not a valid TenSEAL context"):
        he.HeKeys.load(head)


@pytest.mark.parametrize("weight", [0.0, -0.5, 1.5, float("nan")])
def test_bad_weight_raises(keys, weight):
    with pytest.raises(ValueError, match="weight must be a number in \\(0, 1\\]"):
        he.encrypt_update(keys["leader"], _update(0, 8), weight)


def test_non_finite_update_raises(keys):
    with pytest.raises(ValueError, match="finite"):
        he.encrypt_update(keys["leader"], np.array([0.0, np.nan]), 1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"poly_modulus_degree": 2048}, "poly_modulus_degree"),
        ({"coeff_mod_bit_sizes": (60, 60)}, "128-bit security"),
        ({"plain_modulus": 17592186028035}, "1 mod 8192"),
        ({"plain_modulus": 8192 * 3 * 5 * 7 * 11 * 13 * 17 * 19 + 1}, "prime"),
        ({"field_bits": 24}, "overflows plain_modulus"),
    ],
)
def test_bad_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        he.HeParams(**kwargs)


def test_default_plain_modulus_is_a_batching_prime():
    params = he.HeParams()
    assert he._is_prime(params.plain_modulus)
    assert params.plain_modulus % (2 * params.poly_modulus_degree) == 1
    assert 2**43 < params.plain_modulus < 2**44
    assert not he._is_prime(params.plain_modulus + 2 * params.poly_modulus_degree * 3)
