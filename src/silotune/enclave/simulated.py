"""The simulated enclave backend: the app runs in its own Python process, quotes are signed in software.

What it isolates: the host process never holds the enclave's identity key, session keys or the
trunk's state, and talks to it only through :mod:`silotune.enclave.ipc` messages. What it does not:
the host's operating system (and root) can read the enclave process's memory; docs/enclave.md.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from silotune.crypto.identity import IdentityKey, PublicIdentity
from silotune.enclave.apps import APPS
from silotune.enclave.base import Enclave, EnclaveError, OcallHandler, Quote, Tensors
from silotune.enclave.ipc import (
    ChannelConnection,
    Endpoint,
    IpcLink,
    Msg,
    decode_call,
    decode_error,
    encode_call,
    encode_error,
)
from silotune.enclave.measure import measure
from silotune.enclave.platform import load_platform_key
from silotune.enclave.runtime import ATTEST_METHOD
from silotune.errors import SilotuneError
from silotune.transport.base import ConnectionClosed

__all__ = ["SimulatedEnclave"]

log = logging.getLogger(__name__)


class SimulatedEnclave(Enclave):
    """A running simulated enclave; make one with :meth:`start`."""

    def __init__(
        self,
        app: str,
        process: subprocess.Popen[bytes],
        link: IpcLink,
        measurement: bytes,
        identity: PublicIdentity,
    ) -> None:
        self.app = app
        self._process = process
        self._link = link
        self._measurement = measurement
        self.identity = identity
        self._endpoint = Endpoint(link)
        self._dead = False
        self._closed = False
        self._reader = threading.Thread(target=self._read, name=f"enclave-{app}", daemon=True)
        self._reader.start()

    @classmethod
    def start(
        cls,
        app: str,
        app_config: dict[str, Any],
        platform_key: IdentityKey | Path | str,
        *,
        threads: int | None = None,
        start_timeout: float = 600.0,
    ) -> SimulatedEnclave:
        """Spawn ``python -m silotune.enclave.process`` running ``app`` and wait until it is ready.

        Parameters
        ----------
        app
            A name in :data:`~silotune.enclave.apps.APPS`.
        app_config
            The app's configuration (plain JSON; part of the measurement).
        platform_key
            The simulated platform's private key, or the path of its PEM file.
        threads
            Torch threads inside the enclave (not measured).
        start_timeout
            Seconds to wait for the app to be built.

        Raises
        ------
        EnclaveError
            If the app is unknown, fails to start, or measures differently than this host computes.
        """
        if app not in APPS:
            raise EnclaveError(f"unknown enclave app {app!r}; registered: {sorted(APPS)}")
        if isinstance(platform_key, IdentityKey):
            key = platform_key
        else:
            key = load_platform_key(Path(platform_key))
        expected = measure(app, app_config)
        parent, child = socket.socketpair()
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        command = [sys.executable, "-m", "silotune.enclave.process", "--fd", str(child.fileno())]
        process = subprocess.Popen(command, pass_fds=(child.fileno(),), env=env)
        child.close()
        link = IpcLink(parent)
        init = {
            "app": app,
            "config": app_config,
            "platform_key": key.to_pem().decode("ascii"),
            "threads": threads,
        }
        try:
            link.send(Msg.INIT, 0, json.dumps(init).encode("utf-8"))
            link.settimeout(start_timeout)
            kind, _, body = link.recv()
            link.settimeout(None)
        except ConnectionClosed as exc:
            _end(process, link)
            raise EnclaveError(
                f"the simulated enclave process for app {app!r} did not start ({exc})"
            ) from None
        if kind != Msg.READY:
            _end(process, link)
            reason = body.decode("utf-8", "replace") if kind == Msg.FAILED else kind.name
            raise EnclaveError(f"enclave app {app!r} could not start: {reason}")
        ready = json.loads(body)
        measurement = bytes.fromhex(ready["measurement"])
        if measurement != expected:
            _end(process, link)
            raise EnclaveError(
                f"the simulated enclave measured {measurement.hex()} but this host computes "
                f"{expected.hex()} (were silotune's sources edited while it started?)"
            )
        identity = PublicIdentity.from_hex(ready["identity"])
        log.info(
            "Started a SIMULATED enclave (separate process %d, not hardware-isolated): app %r, "
            "measurement %s.",
            process.pid,
            app,
            measurement.hex(),
        )
        return cls(app, process, link, measurement, identity)

    @property
    def measurement(self) -> bytes:
        """SHA-256 of the enclave's code and configuration."""
        return self._measurement

    @property
    def alive(self) -> bool:
        """Whether the enclave process still runs."""
        return not self._dead and self._process.poll() is None

    def attest(self, nonce: bytes) -> Quote:
        """A quote from the enclave answering ``nonce`` (signed by the simulated platform key)."""
        meta, _ = self.call(ATTEST_METHOD, {"nonce": bytes(nonce).hex()}, {})
        return Quote.from_bytes(bytes.fromhex(str(meta["quote"])))

    def call(
        self,
        method: str,
        meta: dict[str, Any],
        tensors: Tensors,
        ocall: OcallHandler | None = None,
    ) -> tuple[dict[str, Any], Tensors]:
        """Run ``method`` in the enclave's app, serving its ocalls with ``ocall`` meanwhile."""
        ident = self._endpoint.new_ident()
        waiting = self._endpoint.waiter(ident)
        try:
            if self._dead:
                raise EnclaveError(self._gone())
            try:
                self._link.send(Msg.CALL, ident, encode_call(method, meta, tensors))
            except ConnectionClosed:
                raise EnclaveError(self._gone()) from None
            while True:
                kind, body = waiting.get()
                if kind == Msg.RETURN:
                    _, out_meta, out_tensors = decode_call(body)
                    return out_meta, out_tensors
                if kind == Msg.OCALL:
                    self._serve_ocall(ident, body, ocall)
                    continue
                raise EnclaveError(
                    f"simulated enclave app {self.app!r} failed in {method!r}: {decode_error(body)}"
                )
        finally:
            self._endpoint.done(ident)

    def _serve_ocall(self, ident: int, body: bytes, handler: OcallHandler | None) -> None:
        try:
            method, meta, tensors = decode_call(body)
            if handler is None:
                raise EnclaveError(
                    f"the enclave made an ocall {method!r} but the call has no handler"
                )
            out_meta, out_tensors = handler(method, meta, tensors)
            self._link.send(Msg.OCALL_RETURN, ident, encode_call("", out_meta, out_tensors))
        except ConnectionClosed:
            pass
        except Exception as exc:
            message = str(exc) if isinstance(exc, SilotuneError) else f"{type(exc).__name__}: {exc}"
            try:
                self._link.send(Msg.OCALL_ERROR, ident, encode_error(message))
            except ConnectionClosed:
                pass

    def open_connection(self, peer: str) -> ChannelConnection:
        """A new relayed connection to the app's ``accept`` (for the host's relay)."""
        if self._dead:
            raise EnclaveError(self._gone())
        ident = self._endpoint.new_ident()
        channel = self._endpoint.add_channel(ident, f"simulated enclave ({self.app})")
        try:
            self._link.send(Msg.OPEN, ident, peer.encode("utf-8"))
        except ConnectionClosed:
            raise EnclaveError(self._gone()) from None
        return channel

    def _gone(self) -> str:
        code = self._process.poll()
        return f"the simulated enclave process for app {self.app!r} exited (code {code})"

    def _read(self) -> None:
        while True:
            try:
                kind, ident, body = self._link.recv()
            except ConnectionClosed:
                break
            if not self._endpoint.route(kind, ident, body):
                log.warning("Ignored a %s message from the enclave.", kind.name)
        self._dead = True
        if not self._closed:
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                pass
            log.error("%s.", self._gone())
        self._endpoint.fail_all(self._gone())

    def close(self) -> None:
        """End the enclave process (it sees the socket close and exits); idempotent."""
        if self._closed:
            return
        self._closed = True
        _end(self._process, self._link)
        self._reader.join(10)


def _end(process: subprocess.Popen[bytes], link: IpcLink) -> None:
    link.close()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
