"""Apps an enclave can run, by name, and the shape every app class has.

An app class is constructed inside the enclave process as ``Cls(config, runtime)`` and answers
calls with ``handle(method, meta, tensors, ocall)``. An app that serves relayed connections (the
trunk) also has ``accept(connection)``, run in its own thread for each connection the host opens.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from silotune.enclave.base import EnclaveError, OcallHandler, Tensors

__all__ = ["APPS", "EnclaveApp", "load_app"]

APPS: dict[str, str] = {
    "selftest": "silotune.enclave.selftest_app:SelfTestApp",
    "trunk": "silotune.split.trunk_app:TrunkEnclaveApp",
    "adapter": "silotune.adapter_tee.app:AdapterEnclaveApp",
    "federated-adapter": "silotune.adapter_tee.fed_app:FederatedAdapterApp",
}


class EnclaveApp(Protocol):
    """What the enclave process calls on an app."""

    def handle(
        self, method: str, meta: dict[str, Any], tensors: Tensors, ocall: OcallHandler
    ) -> tuple[dict[str, Any], Tensors]:
        """Answer one call from the host; raise to fail it (the host gets the message)."""
        ...


def load_app(name: str) -> type[Any]:
    """The app class registered as ``name``."""
    target = APPS.get(name)
    if target is None:
        raise EnclaveError(f"unknown enclave app {name!r}; registered: {sorted(APPS)}")
    module_name, _, class_name = target.partition(":")
    app: type[Any] = getattr(importlib.import_module(module_name), class_name)
    return app
