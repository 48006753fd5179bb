"""Per-job transport keys signed by enrolled identities (federated/pinning.py)."""

import pickle

import pytest

from silotune.crypto.box import new_transport_key, public_bytes
from silotune.crypto.exceptions import AuthenticationError, KeyMaterialError, UnknownIdentityError
from silotune.errors import ConfigError
from silotune.federated.pinning import SiloTrust, simulation_trust

JOB, OTHER_JOB = b"j" * 16, b"k" * 16


def test_silo_trust_checks_signatures_names_jobs_and_configuration() -> None:
    trust = simulation_trust(3)
    assert [t.name for t in trust.values()] == ["silo-0", "silo-1", "silo-2"]
    pk = {p: public_bytes(new_transport_key()) for p in range(3)}
    signed = {
        p: (trust[p].sign(pk[p], JOB)[0], pk[p], trust[p].sign(pk[p], JOB)[1]) for p in range(3)
    }
    trust[0].verify(signed, "test", JOB)
    with pytest.raises(AuthenticationError, match="not signed by enrolled silo 'silo-1'"):
        trust[0].verify({1: (signed[1][0], pk[2], signed[1][2])}, "test", JOB)
    with pytest.raises(AuthenticationError, match="not signed by enrolled silo 'silo-1'"):
        trust[0].verify({1: signed[1]}, "test", OTHER_JOB)  # replayed from another job
    with pytest.raises(AuthenticationError, match="presented as several peers"):
        trust[0].verify({1: signed[1], 2: signed[1]}, "test", JOB)
    with pytest.raises(AuthenticationError, match="unsigned"):
        trust[0].verify({1: ("", pk[1], b"")}, "test", JOB)
    with pytest.raises(UnknownIdentityError):
        trust[0].verify({1: ("silo-9", pk[1], signed[1][2])}, "test", JOB)
    zero = bytes(32)
    with pytest.raises(KeyMaterialError, match="low-order"):
        trust[0].verify({1: ("silo-1", zero, trust[1].sign(zero, JOB)[1])}, "test", JOB)
    SiloTrust().verify({1: ("", pk[1], b"")}, "test", JOB)  # no identities: trusted as relayed
    copy = pickle.loads(pickle.dumps(trust[1]))  # noqa: S301 - our own bytes, as Ray ships it
    assert copy.name == "silo-1" and copy.sign(pk[1], JOB) == trust[1].sign(pk[1], JOB)
    with pytest.raises(ConfigError, match="must be set together"):
        SiloTrust.from_files("identity.pem", None)
