"""Inside the simulated enclave: the runtime an app gets (identity, sealing, quotes) and the loop.

The runtime creates the enclave's Ed25519 identity key at start; it never leaves this process. The
loop reads the host's messages, runs each call in its own thread (so one call may wait on an ocall
while relayed connections keep flowing), and answers every failure with one error message.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from silotune.crypto.identity import IdentityKey
from silotune.enclave.base import EnclaveError, Quote, Tensors
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
from silotune.enclave.platform import platform_secret, sign_quote
from silotune.enclave.sealing import seal, unseal
from silotune.errors import SilotuneError
from silotune.transport.base import ConnectionClosed

__all__ = ["ATTEST_METHOD", "EnclaveRuntime", "serve_link"]

log = logging.getLogger("silotune.enclave")

ATTEST_METHOD = "_attest"  # answered by the runtime itself, never by the app


class EnclaveRuntime:
    """What an app may use inside the enclave: identity, measurement, sealing, quotes, a logger.

    Parameters
    ----------
    app, config
        The app's name and configuration (both measured).
    platform_key
        The simulated platform key (on hardware the CPU holds it, not the enclave).
    """

    def __init__(self, app: str, config: dict[str, Any], platform_key: IdentityKey) -> None:
        self.app = app
        self.measurement = measure(app, config)
        self.identity = IdentityKey.generate()
        self._platform_key = platform_key
        self._secret = platform_secret(platform_key)
        self.log = logging.getLogger(f"silotune.enclave.{app}")

    def quote(self, nonce: bytes) -> Quote:
        """A quote binding this measurement, ``nonce`` and the identity's public key."""
        return sign_quote(self._platform_key, self.measurement, nonce, self.identity.public_bytes())

    def seal(self, data: bytes, label: str) -> bytes:
        """Encrypt ``data`` for this measurement on this platform only."""
        return seal(self._secret, self.measurement, data, label)

    def unseal(self, blob: bytes, label: str) -> bytes:
        """Open a blob this measurement sealed on this platform (SealingError otherwise)."""
        return unseal(self._secret, self.measurement, blob, label)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SilotuneError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _answer_call(
    endpoint: Endpoint, app: Any, runtime: EnclaveRuntime, ident: int, body: bytes
) -> None:
    """Run one call and send its answer (or one error message)."""
    waiting = endpoint.waiter(ident)

    def ocall(
        method: str, meta: dict[str, Any], tensors: Tensors
    ) -> tuple[dict[str, Any], Tensors]:
        endpoint.link.send(Msg.OCALL, ident, encode_call(method, meta, tensors))
        kind, answer = waiting.get()
        if kind == Msg.OCALL_RETURN:
            _, out_meta, out_tensors = decode_call(answer)
            return out_meta, out_tensors
        raise EnclaveError(f"the host's ocall {method!r} failed: {decode_error(answer)}")

    try:
        method, meta, tensors = decode_call(body)
        if method == ATTEST_METHOD:
            nonce = bytes.fromhex(str(meta.get("nonce", "")))
            result: tuple[dict[str, Any], Tensors] = (
                {"quote": runtime.quote(nonce).to_bytes().hex()},
                {},
            )
        else:
            result = app.handle(method, meta, tensors, ocall)
        endpoint.link.send(Msg.RETURN, ident, encode_call("", *result))
    except ConnectionClosed:
        pass
    except Exception as exc:
        runtime.log.error("Call failed inside the simulated enclave: %s", _describe(exc))
        try:
            endpoint.link.send(Msg.ERROR, ident, encode_error(_describe(exc)))
        except ConnectionClosed:
            pass
    finally:
        endpoint.done(ident)


def _accept(app: Any, channel: ChannelConnection) -> None:
    try:
        app.accept(channel)
    except Exception:
        log.exception(
            "A relayed connection from %s failed inside the simulated enclave.", channel.peer
        )
    finally:
        channel.close()


def serve_link(link: IpcLink, app: Any, runtime: EnclaveRuntime) -> None:
    """Serve the host's messages until the link closes (the host ended the enclave)."""
    endpoint = Endpoint(link)
    while True:
        try:
            kind, ident, body = link.recv()
        except ConnectionClosed:
            endpoint.fail_all("the host closed the enclave")
            return
        if kind == Msg.CALL:
            threading.Thread(
                target=_answer_call, args=(endpoint, app, runtime, ident, body), daemon=True
            ).start()
        elif kind == Msg.OPEN:
            if not hasattr(app, "accept"):
                link.send(Msg.CLOSE, ident)
                continue
            # registered before the thread starts, so data right behind the open is not dropped
            channel = endpoint.add_channel(ident, body.decode("utf-8", "replace"))
            threading.Thread(target=_accept, args=(app, channel), daemon=True).start()
        elif not endpoint.route(kind, ident, body):
            log.warning("Ignored a %s message from the host.", kind.name)
