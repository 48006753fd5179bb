"""Entry point of a simulated enclave process: ``python -m silotune.enclave.process --fd N``.

The host (:class:`~silotune.enclave.simulated.SimulatedEnclave`) passes one end of a Unix socket
pair as file descriptor ``N`` and sends the app's name, configuration and the simulated platform
key; this process measures itself, creates its identity key, builds the app, answers ``READY`` and
serves calls and relayed connections until the host closes the socket.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import warnings

from silotune.crypto.identity import IdentityKey
from silotune.enclave.apps import load_app
from silotune.enclave.ipc import IpcLink, Msg
from silotune.enclave.runtime import EnclaveRuntime, serve_link
from silotune.errors import SilotuneError
from silotune.transport.base import ConnectionClosed

log = logging.getLogger("silotune.enclave")


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="[simulated enclave] %(levelname)s %(message)s",
        stream=sys.stderr,
        force=True,
    )
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("transformers", "peft", "datasets", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Run one enclave app over the socket ``--fd``; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="inherited socket to the host")
    args = parser.parse_args(argv)
    _setup_logging()
    link = IpcLink(socket.socket(fileno=args.fd))
    try:
        kind, _, body = link.recv()
    except ConnectionClosed:
        return 2
    if kind != Msg.INIT:
        log.error("The host's first message was %s, not INIT.", kind.name)
        return 2
    try:
        init = json.loads(body)
        if init.get("threads"):
            import torch

            torch.set_num_threads(int(init["threads"]))
        key = IdentityKey.from_pem(str(init["platform_key"]).encode("ascii"))
        runtime = EnclaveRuntime(str(init["app"]), init["config"], key)
        app = load_app(runtime.app)(init["config"], runtime)
    except Exception as exc:
        message = str(exc) if isinstance(exc, SilotuneError) else f"{type(exc).__name__}: {exc}"
        link.send(Msg.FAILED, 0, message.encode("utf-8"))
        return 1
    log.info(
        "Simulated enclave (its own process, NOT hardware-isolated) runs app %r; measurement %s; "
        "identity %s.",
        runtime.app,
        runtime.measurement.hex(),
        runtime.identity.fingerprint(),
    )
    ready = {
        "backend": "simulated",
        "measurement": runtime.measurement.hex(),
        "identity": runtime.identity.public.hex(),
    }
    link.send(Msg.READY, 0, json.dumps(ready).encode("ascii"))
    try:
        serve_link(link, app, runtime)
    finally:
        close = getattr(app, "close", None)
        if callable(close):
            close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
