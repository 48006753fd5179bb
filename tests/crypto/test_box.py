"""End-to-end sealing between silos through the coordinator."""

from __future__ import annotations

import pytest

from silotune.crypto.box import new_transport_key, open_sealed, public_bytes, seal
from silotune.crypto.exceptions import AuthenticationError, KeyMaterialError


def test_seal_round_trip_and_every_kind_of_misuse_is_rejected() -> None:
    a, b, c = new_transport_key(), new_transport_key(), new_transport_key()
    sealed = seal(a, public_bytes(b), b"bundle", 4, b"secret share")
    assert b"secret share" not in sealed
    assert open_sealed(b, public_bytes(a), b"bundle", 4, sealed, "x") == b"secret share"
    tampered = bytearray(sealed)
    tampered[-3] ^= 1
    cases = [
        (b, public_bytes(a), b"bundle", 4, bytes(tampered)),  # tampered in transit
        (b, public_bytes(a), b"bundle", 5, sealed),  # replayed in another round
        (b, public_bytes(a), b"he-secret", 4, sealed),  # moved to another purpose
        (c, public_bytes(a), b"bundle", 4, sealed),  # opened by another silo
        (b, public_bytes(c), b"bundle", 4, sealed),  # claimed to come from another silo
        (b, public_bytes(a), b"bundle", 4, sealed[:20]),  # truncated
    ]
    for own, sender, purpose, round_no, blob in cases:
        with pytest.raises(AuthenticationError, match="the share bundle from silo 1"):
            open_sealed(own, sender, purpose, round_no, blob, "the share bundle from silo 1")
    with pytest.raises(KeyMaterialError, match="32 bytes"):
        seal(a, b"short", b"bundle", 0, b"x")
