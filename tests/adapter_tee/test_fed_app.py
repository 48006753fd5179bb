"""A silo enclave accepts only the roster its job's authority signed, once, and then its stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from silotune.adapter_tee.fed_app import enrollment_statement, federated_app_config
from silotune.adapter_tee.fed_host import LocalSiloEnclave
from silotune.adapter_tee.fed_wire import encode_records
from silotune.crypto.identity import Enrollment, IdentityKey
from silotune.enclave.base import EnclaveError
from silotune.errors import AuthenticationError, PolicyError, UnknownIdentityError
from tests.adapter_tee.fed_harness import fed_job

AUTHORITY = IdentityKey.generate()


@pytest.fixture
def enclave(tmp_path: Path) -> LocalSiloEnclave:
    return LocalSiloEnclave(federated_app_config(fed_job(tmp_path), AUTHORITY.public))


def _roster(
    enclave: LocalSiloEnclave,
    name: str = "silo-0",
    signer: IdentityKey = AUTHORITY,
    measurement: bytes | None = None,
) -> dict[str, bytes]:
    peer = IdentityKey.generate()
    other = "silo-1" if name != "silo-1" else "silo-0"
    roster = Enrollment({name: enclave.runtime.identity.public, other: peer.public})
    text = roster.to_json().encode("utf-8")
    statement = enrollment_statement(measurement or enclave.measurement, text)
    return {"enrollment": text, "signature": signer.sign(statement)}


def test_enrolled_by_the_authority_the_enclave_takes_its_name_and_partition(
    enclave: LocalSiloEnclave,
) -> None:
    info, _ = enclave.call("enroll", {}, _roster(enclave, "silo-1"))
    assert info == {"name": "silo-1", "partition": 1}
    with pytest.raises(EnclaveError, match="already enrolled"):
        enclave.call("enroll", {}, _roster(enclave))


def test_no_stage_runs_before_enrollment(enclave: LocalSiloEnclave) -> None:
    with pytest.raises(EnclaveError, match="not enrolled yet"):
        enclave.call("stage", {"action": "hello", "configs": {}, "arrays": {}}, {})


def test_a_roster_the_host_signed_or_edited_is_refused(enclave: LocalSiloEnclave) -> None:
    with pytest.raises(AuthenticationError):
        enclave.call("enroll", {}, _roster(enclave, signer=IdentityKey.generate()))
    edited = _roster(enclave)
    edited["enrollment"] = edited["enrollment"].replace(b"silo-1", b"silo-7")
    with pytest.raises(AuthenticationError):
        enclave.call("enroll", {}, edited)
    with pytest.raises(AuthenticationError):  # signed for enclaves of another measurement
        enclave.call("enroll", {}, _roster(enclave, measurement=b"\x01" * 32))


def test_a_roster_without_this_enclave_or_with_a_bad_name_is_refused(
    enclave: LocalSiloEnclave,
) -> None:
    stranger = Enrollment({"silo-0": IdentityKey.generate().public}).to_json().encode("utf-8")
    signed = AUTHORITY.sign(enrollment_statement(enclave.measurement, stranger))
    with pytest.raises(UnknownIdentityError):
        enclave.call("enroll", {}, {"enrollment": stranger, "signature": signed})
    with pytest.raises(EnclaveError, match="expected silo-0 .. silo-1"):
        enclave.call("enroll", {}, _roster(enclave, "silo-5"))


def test_unknown_methods_and_stages_are_refused(enclave: LocalSiloEnclave) -> None:
    with pytest.raises(EnclaveError, match="no method 'release'"):
        enclave.call("release", {}, {})
    enclave.call("enroll", {}, _roster(enclave))
    with pytest.raises(EnclaveError, match="unknown silo stage"):
        enclave.call("stage", {"action": "dump_adapter", "configs": {}, "arrays": {}}, {})


def test_asked_for_a_plain_update_the_enclave_refuses_before_training(
    enclave: LocalSiloEnclave,
) -> None:
    """The host (or the coordinator) cannot have the enclave release its update in clear."""
    enclave.call("enroll", {}, _roster(enclave))
    body = RecordDict()
    body["config"] = ConfigRecord({"round": 1, "job": "ab" * 16})
    size = sum(p.numel() for p in enclave.app.job.model.parameters() if p.requires_grad)
    body["arrays"] = ArrayRecord({"global": Array(np.zeros(size, dtype=np.float32))})
    meta, values = encode_records(body)
    with pytest.raises(PolicyError, match="this silo's config demands 'masking'"):
        enclave.call("stage", {**meta, "action": "plain"}, values)
    assert enclave.app.offload.take_stats().ocalls == 0  # refused before any training
