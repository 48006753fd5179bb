"""A small app that exercises every part of the enclave interface (tests, ``silotune enclave check``).

Methods: ``echo`` returns its tensors times ``meta["scale"]``; ``seal`` / ``unseal`` run the
runtime's sealing on bytes (as an ``int32`` view); ``ocall`` asks the host's ``double`` ocall and
returns its answer plus one; ``fail`` raises; ``info`` returns the measurement and identity.
It also accepts relayed connections and echoes each message back reversed.
"""

from __future__ import annotations

from typing import Any

from silotune.enclave.base import EnclaveError, OcallHandler, Tensors
from silotune.enclave.ipc import bytes_to_tensor, tensor_to_bytes
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
            return {"n": len(tensors)}, {k: v * scale for k, v in tensors.items()}
        if method in ("seal", "unseal"):
            data = tensor_to_bytes(tensors["data"], int(meta["length"]))
            label = str(meta["label"])
            if method == "seal":
                out = self.runtime.seal(data, label)
            else:
                out = self.runtime.unseal(data, label)
            return {"length": len(out)}, {"data": bytes_to_tensor(out)}
        if method == "ocall":
            _, answer = ocall("double", {}, {"x": tensors["x"]})
            return {}, {"x": answer["x"] + 1}
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
