"""The coordinator's host side of a trunk in an enclave: relay silo connections, poll, save sealed.

The host accepts silos' gRPC + TLS connections as usual but only copies each connection's messages
to and from the enclave (:meth:`EnclaveRelay.handle`); it holds no session key and never decodes
what it forwards. :class:`EnclaveTrunk` stands where a :class:`~silotune.split.trunk.TrunkService`
stands in the runner: ``handle``, ``records``, ``finished`` and ``commits``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from silotune.enclave.base import EnclaveError
from silotune.enclave.ipc import take_bytes
from silotune.enclave.simulated import SimulatedEnclave
from silotune.errors import SplitError
from silotune.transport.base import Connection, TransportError

if TYPE_CHECKING:
    from silotune.config import JobConfig
    from silotune.crypto.identity import Enrollment, IdentityKey
    from silotune.split.trunk import SessionRecord

__all__ = ["SEALED_TRUNK", "EnclaveRelay", "EnclaveTrunk", "Tap"]

log = logging.getLogger(__name__)

SEALED_TRUNK = "trunk_adapter.sealed"
Tap = Callable[[str, bytes], None]
"""Sees every relayed message: ``tap("to_enclave" | "to_silo", message)`` (tests, auditing)."""


class EnclaveRelay:
    """Copies whole messages between each silo connection and a new enclave connection."""

    def __init__(self, enclave: SimulatedEnclave, tap: Tap | None = None) -> None:
        self.enclave = enclave
        self.tap = tap

    def handle(self, connection: Connection) -> None:
        """Relay one silo's connection until either side closes it."""
        inner = self.enclave.open_connection(connection.peer)
        back = threading.Thread(target=self._pump, args=(inner, connection, "to_silo"), daemon=True)
        back.start()
        self._pump(connection, inner, "to_enclave")
        back.join(10)

    def _pump(self, source: Connection, sink: Connection, direction: str) -> None:
        try:
            while True:
                message = source.recv()
                if self.tap is not None:
                    self.tap(direction, message)
                sink.send(message)
        except TransportError:
            pass
        finally:
            sink.close()
            source.close()


class EnclaveTrunk:
    """A trunk running in a simulated enclave, served through an :class:`EnclaveRelay`.

    Parameters
    ----------
    enclave
        A started enclave running the ``trunk`` app.
    tap
        Optional observer of every relayed message.
    poll_s
        Seconds between status polls.
    """

    def __init__(self, enclave: SimulatedEnclave, tap: Tap | None = None, poll_s: float = 0.2):
        self.enclave = enclave
        self.relay = EnclaveRelay(enclave, tap)
        self.records: list[SessionRecord] = []
        self.commits = 0
        self.finished = threading.Event()
        self.error: str | None = None
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="enclave-status", daemon=True)
        self._poller.start()

    @classmethod
    def start(
        cls,
        cfg: JobConfig,
        enrollment: Enrollment,
        platform_key: IdentityKey | Path,
        *,
        threads: int | None = None,
        tap: Tap | None = None,
    ) -> EnclaveTrunk:
        """Start the ``trunk`` app for job ``cfg`` with ``enrollment`` in a simulated enclave."""
        from silotune.split.trunk_app import trunk_app_config

        enclave = SimulatedEnclave.start(
            "trunk", trunk_app_config(cfg, enrollment), platform_key, threads=threads
        )
        return cls(enclave, tap)

    def handle(self, connection: Connection) -> None:
        """Relay one silo's connection to the enclave (the transport server's handler)."""
        self.relay.handle(connection)

    def check(self) -> None:
        """Fetch the enclave's last records; raise SplitError if the enclave failed."""
        try:
            self.refresh()
        except EnclaveError as exc:
            self.error = self.error or str(exc)
        if self.error is not None:
            raise SplitError(f"the trunk's simulated enclave failed: {self.error}")

    def save(self, out: Path, cfg: JobConfig) -> dict[str, Any]:
        """The host keeps the trunk adapter only sealed to the enclave's measurement."""
        sealed = self.save_sealed(cfg.enclave.seal_dir or out / "sealed")
        return {"trunk_adapter_sealed": str(sealed), **self.describe()}

    def describe(self) -> dict[str, Any]:
        return {"enclave": {"backend": "simulated", "measurement": self.measurement.hex()}}

    @property
    def measurement(self) -> bytes:
        """The enclave's measurement (what silos allow-list)."""
        return self.enclave.measurement

    def refresh(self) -> dict[str, Any]:
        """Fetch the enclave's status now; returns it."""
        from silotune.split.trunk import SessionRecord

        meta, _ = self.enclave.call("status", {}, {})
        self.records = [SessionRecord(**record) for record in meta["records"]]
        self.commits = int(meta["commits"])
        if meta["finished"]:
            self.finished.set()
        return meta

    def _poll(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.refresh()
            except EnclaveError as exc:
                if not self._stop.is_set():
                    self.error = str(exc)
                    log.error("The trunk enclave failed: %s", exc)
                    self.finished.set()
                return
            if self.finished.is_set():
                return

    def save_sealed(self, folder: Path) -> Path:
        """Write the trunk adapter, sealed to the enclave's measurement, to ``folder``."""
        meta, tensors = self.enclave.call("seal_trunk", {}, {})
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / SEALED_TRUNK
        path.write_bytes(take_bytes(tensors, "blob"))
        log.info(
            "Trunk adapter sealed by the simulated enclave (%d tensors) to %s.",
            meta["tensors"],
            path,
        )
        return path

    def close(self) -> None:
        """Stop polling and end the enclave."""
        self._stop.set()
        self._poller.join(5)
        self.enclave.close()
