"""A relayed Flower message survives the enclave boundary exactly; malformed ones are refused."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from silotune.adapter_tee.fed_wire import decode_records, encode_records
from silotune.enclave.base import EnclaveError


def _body() -> RecordDict:
    body = RecordDict()
    body["config"] = ConfigRecord({"round": 3, "job": "ab" * 16, "weight": 0.5, "ok": True})
    body["arrays"] = ArrayRecord(
        {
            "global": Array(np.linspace(-1, 1, 7, dtype=np.float32)),
            "msg": Array(np.frombuffer(b"\x00\xffbytes", dtype=np.uint8)),
            "support": Array(np.array([1, 5, 9], dtype=np.int64)),
        }
    )
    return body


def test_a_message_round_trips_exactly() -> None:
    meta, values = encode_records(_body())
    back = decode_records(meta, values)
    assert dict(back.config_records["config"]) == dict(_body().config_records["config"])
    for key, array in _body().array_records["arrays"].items():
        got = back.array_records["arrays"][key].numpy()
        assert got.dtype == array.numpy().dtype and np.array_equal(got, array.numpy())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m, v: v.update({"a/arrays/global": b"\x00" * 27}), "holds 27 bytes"),
        (lambda m, v: v.pop("a/arrays/msg"), "missing its bytes"),
        (lambda m, v: m["arrays"]["arrays"]["global"].update(dtype="object"), "no allowed dtype"),
        (lambda m, v: m["arrays"]["arrays"]["global"].update(shape=[-1]), "no valid shape"),
        (lambda m, v: m["configs"]["config"].update(round=[1, 2]), "another type"),
        (lambda m, v: m.pop("configs"), "needs 'configs' and 'arrays'"),
    ],
)
def test_a_malformed_message_is_refused(edit, message: str) -> None:
    meta, values = encode_records(_body())
    edit(meta, values)
    with pytest.raises(EnclaveError, match=message):
        decode_records(meta, values)
