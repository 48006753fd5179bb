"""End-to-end sealing between silos through the coordinator."""

from __future__ import annotations

import pickle

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


def test_silo_trust_checks_signatures_names_and_configuration() -> None:
    from silotune.crypto.exceptions import UnknownIdentityError
    from silotune.errors import ConfigError
    from silotune.federated.pinning import SiloTrust, simulation_trust

    trust = simulation_trust(3)
    assert [t.name for t in trust.values()] == ["silo-0", "silo-1", "silo-2"]
    pk = {p: public_bytes(new_transport_key()) for p in range(3)}
    signed = {p: (trust[p].sign(pk[p])[0], pk[p], trust[p].sign(pk[p])[1]) for p in range(3)}
    trust[0].verify(signed, "test")
    with pytest.raises(AuthenticationError, match="not signed by enrolled silo 'silo-1'"):
        trust[0].verify({1: (signed[1][0], pk[2], signed[1][2])}, "test")
    with pytest.raises(AuthenticationError, match="presented as several peers"):
        trust[0].verify({1: signed[1], 2: signed[1]}, "test")
    with pytest.raises(AuthenticationError, match="unsigned"):
        trust[0].verify({1: ("", pk[1], b"")}, "test")
    with pytest.raises(UnknownIdentityError):
        trust[0].verify({1: ("silo-9", pk[1], signed[1][2])}, "test")
    SiloTrust().verify({1: ("", pk[1], b"")}, "test")  # no identities: trusted as relayed
    copy = pickle.loads(pickle.dumps(trust[1]))  # noqa: S301 - our own bytes, as Ray ships it
    assert copy.name == "silo-1" and copy.sign(pk[1]) == trust[1].sign(pk[1])
    with pytest.raises(ConfigError, match="must be set together"):
        SiloTrust.from_files("identity.pem", None)
