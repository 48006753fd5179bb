"""Sealed storage opens only for the same measurement, platform and label, and detects tampering."""

from __future__ import annotations

import pytest

from silotune.crypto.identity import IdentityKey
from silotune.enclave.measure import measure
from silotune.enclave.platform import platform_secret
from silotune.enclave.sealing import SealingError, seal, unseal

SECRET = platform_secret(IdentityKey.generate())
M1, M2 = measure("trunk", {"lr": 1e-3}), measure("trunk", {"lr": 2e-3})


def test_seal_round_trips_and_hides_the_data():
    blob = seal(SECRET, M1, b"trunk adapter bytes", "trunk_adapter")
    assert b"trunk adapter" not in blob
    assert unseal(SECRET, M1, blob, "trunk_adapter") == b"trunk adapter bytes"


def test_another_measurement_cannot_unseal():
    blob = seal(SECRET, M1, b"secret", "trunk_adapter")
    with pytest.raises(SealingError, match="another enclave measurement"):
        unseal(SECRET, M2, blob, "trunk_adapter")


def test_another_platform_or_label_cannot_unseal():
    blob = seal(SECRET, M1, b"secret", "trunk_adapter")
    with pytest.raises(SealingError):
        unseal(platform_secret(IdentityKey.generate()), M1, blob, "trunk_adapter")
    with pytest.raises(SealingError):
        unseal(SECRET, M1, blob, "other")


@pytest.mark.parametrize("index", [5, 20, -1])
def test_a_flipped_bit_is_detected(index):
    blob = bytearray(seal(SECRET, M1, b"secret data", "x"))
    blob[index] ^= 0x10
    with pytest.raises(SealingError):
        unseal(SECRET, M1, bytes(blob), "x")


def test_measurement_changes_with_app_config_and_name():
    assert len(M1) == 32 and M1 != M2
    assert measure("trunk", {"lr": 1e-3}) == M1
    assert measure("selftest", {"lr": 1e-3}) != M1
    assert measure("trunk", {"lr": 1e-3}, code=b"\x00" * 32) != M1
