"""A small app that exercises every part of the enclave interface (tests, ``silotune enclave check``).

Methods: ``echo`` returns its tensors times ``meta["scale"]``; ``seal`` / ``unseal`` run the
runtime's sealing on bytes (as an ``int32`` view); ``ocall`` asks the host's ``double`` ocall and
returns its answer plus one; ``fail`` raises; ``info`` returns the measurement and identity.
It also accepts relayed connections and echoes each message back reversed.
"""

from __future__ import annotations

from typing import Any

from silotune.enclave.base import EnclaveError, OcallHandler, Tensors
from silotune.enclave.ipc import take_bytes, take_tensor
from silotune.enclave.runtime import EnclaveRuntime
from silotune.transport.base import Connection, ConnectionClosed

__all__ = ["SelfTestApp"]


class SelfTestApp:
    """See the module docstring."""

    def __init__(self, config: dict[str, Any], runtime: EnclaveRuntime) -> None:
        self.config = config
        self.runtime = runtime

    def handle(
        self, method: str, meta: dict[str, Any], tensors: Tensors, ocall: OcallHandler
    ) -> tuple[dict[str, Any], Tensors]:
        """Answer one call (see the module docstring)."""
        if method == "echo":
            scale = float(meta.get("scale", 1.0))
            return {"n": len(tensors)}, {k: take_tensor(tensors, k) * scale for k in tensors}
        if method in ("seal", "unseal"):
            data = take_bytes(tensors, "data")
            label = str(meta["label"])
            if method == "seal":
                out = self.runtime.seal(data, label)
            else:
                out = self.runtime.unseal(data, label)
            return {"length": len(out)}, {"data": out}
        if method == "ocall":
            _, answer = ocall("double", {}, {"x": take_tensor(tensors, "x")})
            return {}, {"x": take_tensor(answer, "x") + 1}
        if method == "fail":
            raise EnclaveError(f"self-test failure requested: {meta.get('why', 'no reason')}")
        if method == "info":
            return {
                "measurement": self.runtime.measurement.hex(),
                "identity": self.runtime.identity.public.hex(),
            }, {}
        raise EnclaveError(f"the selftest app has no method {method!r}")

    def accept(self, connection: Connection) -> None:
        """Echo every message back reversed until the host closes the connection."""
        try:
            while True:
                connection.send(connection.recv()[::-1])
        except ConnectionClosed:
            return
