"""Tests for the seed-expanding PRG: known answers, domain separation, input checks."""

import hashlib
import hmac
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from silotune.crypto import prg
from silotune.crypto.exceptions import KeyMaterialError

SEED = bytes(range(32))


def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 written out with hmac, independent of the library under test."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def test_reference_hkdf_matches_rfc5869_case_1():
    okm = _hkdf_sha256(
        bytes.fromhex("0b" * 22),
        bytes.fromhex("000102030405060708090a0b0c"),
        bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
        42,
    )
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_known_answer_vector():
    words = prg.expand(SEED, 4, label=b"kat", round_id=7, index=3)
    assert words.dtype == np.uint32
    assert words.tolist() == [4117435190, 2104220011, 3513488858, 2797267626]


def test_stream_is_aes256_ctr_under_hkdf_key():
    label, round_id, index = b"pair", 5, 9
    info = bytes([len(label)]) + label + struct.pack(">QQ", round_id, index)
    key = _hkdf_sha256(SEED, b"silotune/prg/v1", info, 32)
    assert prg.derive_key(SEED, label=label, round_id=round_id, index=index) == key
    # CTR keystream = AES-ECB of the big-endian counter blocks 0, 1, 2, ...
    blocks = b"".join(i.to_bytes(16, "big") for i in range(5))
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    expected = ecb.update(blocks) + ecb.finalize()
    got = prg.expand(SEED, 20, label=label, round_id=round_id, index=index)
    assert got.tobytes() == np.frombuffer(expected, dtype="<u4").tobytes()


def test_prefix_property_and_length():
    long = prg.expand(SEED, 1000, label=b"x")
    short = prg.expand(SEED, 10, label=b"x")
    assert long.shape == (1000,)
    np.testing.assert_array_equal(long[:10], short)
    assert prg.expand(SEED, 0, label=b"x").shape == (0,)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"label": b"y"},
        {"label": b"x", "round_id": 1},
        {"label": b"x", "index": 1},
        {"label": b"xx"},
    ],
)
def test_domain_separation_changes_stream(kwargs):
    base = prg.expand(SEED, 64, label=b"x")
    other = prg.expand(SEED, 64, **kwargs)
    assert not np.array_equal(base, other)


def test_different_seeds_give_different_streams():
    a = prg.expand(SEED, 64, label=b"x")
    b = prg.expand(bytes(32), 64, label=b"x")
    assert not np.array_equal(a, b)


def test_output_looks_uniform():
    words = prg.expand(SEED, 1 << 16, label=b"stats")
    # Mean of U[0, 2**32) is 2**31; the standard error for 65,536 words is ~0.0045 * 2**32.
    assert abs(words.astype(np.float64).mean() / 2**32 - 0.5) < 0.01
    assert len(np.unique(words)) > (1 << 16) - 10


@pytest.mark.parametrize("seed", [b"", bytes(16), bytes(33)])
def test_wrong_seed_size_raises(seed):
    with pytest.raises(KeyMaterialError, match="32 bytes"):
        prg.expand(seed, 4, label=b"x")


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="seed must be bytes"):
        prg.expand("a" * 32, 4, label=b"x")
    with pytest.raises(ValueError, match="label"):
        prg.expand(SEED, 4, label=b"")
    with pytest.raises(ValueError, match="round_id"):
        prg.expand(SEED, 4, label=b"x", round_id=-1)
    with pytest.raises(ValueError, match="n must be"):
        prg.expand(SEED, -1, label=b"x")
