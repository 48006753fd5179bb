"""Quotes: a fixed, validated encoding, and verification that raises on every bad quote."""

from __future__ import annotations

import os

import pytest

from silotune.crypto.identity import IdentityKey
from silotune.enclave.base import AttestationError, AttestationPolicy, Quote, verify_quote
from silotune.enclave.platform import sign_quote

MEASUREMENT = bytes(range(32))


@pytest.fixture
def platform() -> IdentityKey:
    return IdentityKey.generate()


def _quote(platform: IdentityKey, nonce: bytes, measurement: bytes = MEASUREMENT) -> Quote:
    return sign_quote(platform, measurement, nonce, b"\x07" * 32)


def test_quote_round_trips_and_verifies(platform):
    nonce = os.urandom(32)
    quote = _quote(platform, nonce)
    raw = quote.to_bytes()
    assert Quote.from_bytes(raw) == quote
    policy = AttestationPolicy(platform.public, frozenset({MEASUREMENT}))
    good = verify_quote(raw, policy, nonce)
    assert good.report_data == b"\x07" * 32 and good.backend == "simulated"


def test_a_measurement_not_allow_listed_is_refused(platform):
    nonce = os.urandom(16)
    policy = AttestationPolicy(platform.public, frozenset({bytes(32)}))
    with pytest.raises(AttestationError, match="not in the allow-list"):
        verify_quote(_quote(platform, nonce), policy, nonce)


def test_a_replayed_quote_is_refused(platform):
    old_nonce, fresh_nonce = os.urandom(16), os.urandom(16)
    policy = AttestationPolicy(platform.public, frozenset({MEASUREMENT}))
    with pytest.raises(AttestationError, match="replayed"):
        verify_quote(_quote(platform, old_nonce), policy, fresh_nonce)


def test_another_platform_or_a_flipped_bit_fails_the_signature(platform):
    nonce = os.urandom(16)
    policy = AttestationPolicy(platform.public, frozenset({MEASUREMENT}))
    forged = _quote(IdentityKey.generate(), nonce)
    with pytest.raises(AttestationError, match="signature does not verify"):
        verify_quote(forged, policy, nonce)
    raw = bytearray(_quote(platform, nonce).to_bytes())
    raw[-70] ^= 1  # inside report_data
    with pytest.raises(AttestationError, match="signature does not verify"):
        verify_quote(bytes(raw), policy, nonce)


def test_an_unknown_backend_is_refused(platform):
    nonce = os.urandom(16)
    quote = Quote("sgx-dcap", MEASUREMENT, nonce, b"", b"\x00" * 64)
    policy = AttestationPolicy(platform.public, frozenset({MEASUREMENT}))
    with pytest.raises(AttestationError, match="backend 'sgx-dcap'"):
        verify_quote(quote, policy, nonce)


@pytest.mark.parametrize(
    ("cut", "message"),
    [(3, "does not start"), (40, "truncated"), (-1, "truncated")],
)
def test_malformed_quotes_are_refused(platform, cut, message):
    raw = _quote(platform, os.urandom(16)).to_bytes()
    with pytest.raises(AttestationError, match=message):
        Quote.from_bytes(raw[:cut] if cut > 3 or cut < 0 else b"XXXX" + raw[4:])


def test_trailing_bytes_and_bad_sizes_are_refused(platform):
    raw = _quote(platform, os.urandom(16)).to_bytes()
    with pytest.raises(AttestationError, match="trailing"):
        Quote.from_bytes(raw + b"\x00")
    with pytest.raises(AttestationError, match="nonce must be 16..64 bytes"):
        Quote("simulated", MEASUREMENT, b"short", b"")
    with pytest.raises(AttestationError, match="measurement must be 32 bytes"):
        Quote("simulated", b"\x00" * 31, os.urandom(16), b"")


def test_a_short_verifier_nonce_and_an_empty_allow_list_are_refused(platform):
    with pytest.raises(AttestationError, match="at least one allowed measurement"):
        AttestationPolicy(platform.public, frozenset())
    policy = AttestationPolicy(platform.public, frozenset({MEASUREMENT}))
    with pytest.raises(AttestationError, match="at least 16 bytes"):
        verify_quote(_quote(platform, os.urandom(16)), policy, b"123")
