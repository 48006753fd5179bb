"""`mode: federated` with `adapter.placement: enclave`: every silo's adapter lives in its enclave.

The silo's host (its REE) starts the silo's enclave (:mod:`silotune.adapter_tee.fed_app`), serves
its masked frozen-linear ocalls, and relays the coordinator's stage messages to it and its replies
back; it never holds the silo's trained adapter, its update, its optimizer state or any secret of
secure aggregation. The job's enrollment authority (here: this launcher) checks each enclave's
quote before it enrolls the enclave's identity key, and signs the roster; enclaves accept no other.

Simulation only: the enclaves are processes of this launcher, so the silos' ClientApp runs in this
process (:class:`~silotune.federated.local_grid.LocalGrid`), not in Flower's Ray workers.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from silotune.adapter_tee.app import check_enclave_job
from silotune.adapter_tee.fed_app import (
    FederatedAdapterApp,
    enrollment_statement,
    federated_app_config,
)
from silotune.adapter_tee.fed_wire import decode_records, encode_records
from silotune.adapter_tee.masked_linear import FrozenLinearServer
from silotune.adapter_tee.runner import EnclaveCalls, load_ree_model
from silotune.config import JobConfig
from silotune.crypto.identity import Enrollment, IdentityKey
from silotune.enclave.base import AttestationPolicy, OcallHandler, Tensors, verify_quote
from silotune.enclave.measure import measure
from silotune.enclave.platform import load_platform_key
from silotune.enclave.simulated import SimulatedEnclave
from silotune.errors import ConfigError
from silotune.federated import silo
from silotune.federated.coordinator import Coordinator
from silotune.federated.local_grid import LocalGrid, task_identity
from silotune.train.run_folder import SUMMARY_FILE, check_output_dir, reset_output_dir
from silotune.train.threads import apply_threads, threads_per_process

__all__ = [
    "APP",
    "LocalSiloEnclave",
    "SiloEnclaves",
    "check_federated_enclave_job",
    "make_enclave_client_app",
    "open_silo_enclaves",
    "train_federated_in_enclaves",
]

log = logging.getLogger(__name__)

APP = "federated-adapter"
# Wraps silo p's enclave before the run uses it (tests record what crosses the boundary).
Wrap = Callable[[int, EnclaveCalls], EnclaveCalls]


def check_federated_enclave_job(cfg: JobConfig) -> None:
    """Refuse, with one sentence, a federated job whose adapter cannot live in the silos' enclaves."""
    if cfg.mode != "federated":
        raise ConfigError(f"the federated adapter enclave needs mode federated, not '{cfg.mode}'")
    check_enclave_job(cfg)  # LoRA only, no SPF, float32
    fed = cfg.federation
    if fed.secure_aggregation not in ("masking", "he"):
        raise ConfigError(
            "adapter.placement enclave in mode federated needs federation.secure_aggregation "
            f"masking or he, not '{fed.secure_aggregation}': with none each silo's update would "
            "leave its enclave in clear"
        )
    if not fed.simulation:
        raise ConfigError(
            "adapter.placement enclave in mode federated runs with federation.simulation true "
            "only; a deployed silo (Flower SuperNode) does not start an enclave yet"
        )


@dataclass
class SiloEnclaves:
    """The started, attested and enrolled enclaves of a simulated job, by partition."""

    enclaves: dict[int, EnclaveCalls]
    enrollment: Enrollment  # silo-<p> -> the identity key quoted by enclave p
    measurement: bytes


class _LocalRuntime:
    """What the app uses of an enclave runtime, in this process: an identity, the measurement."""

    def __init__(self, app_config: dict[str, Any]) -> None:
        self.identity = IdentityKey.generate()
        self.measurement = measure(APP, app_config)


class LocalSiloEnclave:
    """One silo's app called in this process behind the same ``call`` seam (tests, profiling).

    It isolates nothing and cannot be attested; training runs use
    :class:`~silotune.enclave.simulated.SimulatedEnclave`.
    """

    def __init__(self, app_config: dict[str, Any]) -> None:
        self.runtime = _LocalRuntime(app_config)
        self.measurement = self.runtime.measurement
        self.app = FederatedAdapterApp(app_config, self.runtime)

    def call(
        self,
        method: str,
        meta: dict[str, Any],
        tensors: Tensors,
        ocall: OcallHandler | None = None,
    ) -> tuple[dict[str, Any], Tensors]:
        """Run ``method`` of the app here, serving its ocalls with ``ocall``."""

        def refuse(name: str, _m: dict[str, Any], _t: Tensors) -> tuple[dict[str, Any], Tensors]:
            raise RuntimeError(f"the enclave made an ocall {name!r} but the call has no handler")

        return self.app.handle(method, meta, tensors, ocall or refuse)


@contextmanager
def open_silo_enclaves(cfg: JobConfig, in_process: bool = False) -> Iterator[SiloEnclaves]:
    """Start one enclave per silo, verify each quote, enroll the quoted keys, sign the roster.

    The platform key is ``enclave.platform_key`` or a throwaway one; accepted measurements are
    ``enclave.allowed_measurements`` or, if empty, the one this build computes. A quote for any
    other measurement, platform or nonce raises ``AttestationError`` before anything is enrolled.
    ``in_process`` runs the apps here instead (:class:`LocalSiloEnclave`: nothing to attest).
    """
    authority = (
        IdentityKey.generate()
    )  # this job's enrollment authority; only its public key is measured
    app_config = federated_app_config(cfg, authority.public)
    platform = (
        load_platform_key(cfg.enclave.platform_key)
        if cfg.enclave.platform_key is not None
        else IdentityKey.generate()
    )
    allowed = cfg.enclave.allowed_measurements or [measure(APP, app_config).hex()]
    policy = AttestationPolicy.from_hex(platform.public, allowed)
    silos = cfg.federation.silos
    threads = threads_per_process(cfg, silos + 1)
    apply_threads(threads)
    with ExitStack() as stack:
        enclaves: dict[int, EnclaveCalls] = {}
        members = {}
        for p in range(silos):
            if in_process:
                local = LocalSiloEnclave(app_config)
                enclaves[p], members[f"silo-{p}"] = local, local.runtime.identity.public_bytes()
                continue
            enclave = stack.enter_context(
                SimulatedEnclave.start(APP, app_config, platform, threads=threads)
            )
            nonce = os.urandom(32)
            quote = verify_quote(enclave.attest(nonce), policy, nonce)
            enclaves[p], members[f"silo-{p}"] = enclave, quote.report_data
        enrollment = Enrollment(members)
        text = enrollment.to_json().encode("utf-8")
        measurement = enclaves[0].measurement
        signature = authority.sign(enrollment_statement(measurement, text))
        for enclave in enclaves.values():
            enclave.call("enroll", {}, {"enrollment": text, "signature": signature})
        log.info(
            "%d silo enclaves attested (simulated) and enrolled, measurement %s",
            silos,
            measurement.hex(),
        )
        yield SiloEnclaves(enclaves, enrollment, measurement)


def make_enclave_client_app(
    enclaves: Mapping[int, EnclaveCalls], server: OcallHandler
) -> ClientApp:
    """The silos' ClientApp: each stage is relayed to the node's enclave, its reply relayed back."""
    app = ClientApp()
    for action in silo.ACTIONS:

        def stage(message: Message, context: Context, action: str = action) -> Message:
            partition = int(context.node_config["partition-id"])  # type: ignore[arg-type]
            meta, values = encode_records(message.content)
            meta["action"] = action
            out_meta, out_values = enclaves[partition].call("stage", meta, values, server)
            cost = out_meta.pop("cost", {})
            log.debug("silo %d %s: %s", partition, action, cost)
            return Message(decode_records(out_meta, out_values), reply_to=message)

        app.train(action)(stage)
    return app


def train_federated_in_enclaves(
    cfg: JobConfig,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    wrap: Wrap | None = None,
    in_process: bool = False,
) -> dict[str, Any]:
    """Run a simulated federated job with every silo's adapter in its own (simulated) enclave.

    ``wrap`` replaces each silo's enclave handle before use (tests record the boundary with it);
    ``in_process`` calls the silos' apps in this process, unattested (tests, profiling).

    Raises
    ------
    ConfigError
        For jobs the silos' enclaves cannot run (:func:`check_federated_enclave_job`) and for
        ``resume`` (not implemented: the silos' enclaves keep no sealed state between runs).
    AttestationError
        If a silo's enclave does not prove an accepted measurement.
    """
    check_federated_enclave_job(cfg)
    if resume:
        raise ConfigError(
            "--resume is not implemented for mode federated with adapter.placement enclave"
        )
    check_output_dir(cfg, resume=False, overwrite=overwrite)
    ree = load_ree_model(cfg)
    server = FrozenLinearServer.from_model(ree.model)
    with open_silo_enclaves(cfg, in_process) as started:
        reset_output_dir(cfg)  # only now: a refused enclave leaves an old run as it was
        enclaves = started.enclaves
        if wrap is not None:
            enclaves = {p: wrap(p, enclave) for p, enclave in enclaves.items()}
        grid = LocalGrid(make_enclave_client_app(enclaves, server), cfg.federation.silos)
        with task_identity():
            coordinator = Coordinator(
                cfg, grid, resume=False, progress=progress, enrollment=started.enrollment
            )
            summary = coordinator.run()
    summary.update(
        adapter_placement="enclave",
        enclave_backend="in-process" if in_process else "simulated",
        enclave_measurement=started.measurement.hex(),
    )
    (cfg.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
