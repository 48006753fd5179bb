"""The enclave app of one silo in `mode: federated` with `adapter.placement: enclave`.

It holds what the silo must not let its own host see: the LoRA adapter while it trains, AdamW,
the silo's training data and batches, the update, and every secret of secure aggregation (the
silo's Ed25519 identity, its X25519 transport key, the HE secret key, the masking keys, seeds and
Shamir shares). It answers the silo's stage messages itself, with the same code a plain silo runs
(:func:`silotune.federated.silo.handle`), so every check of secure aggregation (signed and pinned
keys, the silo's own policy, replay histories, the decryption guard) runs here unchanged; the
host relays the messages (:mod:`silotune.adapter_tee.fed_wire`) and computes the frozen linear
layers on masked tensors, as in the centralized adapter-in-TEE mode.

Methods, in order:

* ``enroll`` + ``enrollment`` (JSON) + ``signature``: once. The job's enrollment authority (whose
  public key is in the measured configuration) signs the roster of attested enclave identities;
  the enclave finds its own identity in it, and its name ``silo-<p>`` names its data partition.
  A host cannot add or swap peers without the authority's key.
* ``stage`` ``{"action": ...}`` + a relayed message: one silo stage (``train.<action>``); the
  reply is relayed back. Updates leave only as a masked vector or an HE ciphertext. With HE, a
  global adapter that does not follow from the last aggregate this enclave decrypted is refused
  (:mod:`silotune.adapter_tee.fed_check`).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context, RecordDict

from silotune.adapter_tee.app import build_enclave_job, checked_app_config, enclave_app_config
from silotune.adapter_tee.fed_check import GlobalCheck
from silotune.adapter_tee.fed_wire import decode_records, encode_records
from silotune.adapter_tee.masked_linear import LinearOffload
from silotune.adapter_tee.masked_stream import MaskStream
from silotune.config import JobConfig
from silotune.crypto.identity import Enrollment, PublicIdentity
from silotune.enclave.base import EnclaveError, OcallHandler, Tensors
from silotune.enclave.ipc import take_bytes
from silotune.errors import CryptoError
from silotune.federated import silo
from silotune.federated.pinning import SiloTrust
from silotune.federated.vectors import get_bytes, get_config, get_vector
from silotune.secagg.he_guard import unpack_contributions

__all__ = ["ENROLL_CONTEXT", "FederatedAdapterApp", "enrollment_statement", "federated_app_config"]

ENROLL_CONTEXT = b"silotune/federated-enclave/enrollment/v1\x00"
_NAME = re.compile(r"silo-(\d{1,6})")
# Machine-local keys of the federation section: not the recipe, so not measured.
_LOCAL_KEYS = {"identity_key", "enrollment", "round_timeout_s"}


def federated_app_config(cfg: JobConfig, authority: PublicIdentity) -> dict[str, Any]:
    """The measured configuration: the adapter app's, the federation recipe, the authority key."""
    config = enclave_app_config(cfg)
    federation = cfg.federation.model_dump(mode="json", exclude=_LOCAL_KEYS)
    config["job"] = {**config["job"], "mode": "federated", "federation": federation}
    config["authority"] = authority.hex()
    return config


def enrollment_statement(measurement: bytes, enrollment: bytes) -> bytes:
    """What the enrollment authority signs: the enclaves' measurement and the roster's JSON."""
    return ENROLL_CONTEXT + measurement + enrollment


@dataclass
class _Relayed:
    """The one part of a Flower message a silo stage reads (Flower's own needs a task identity)."""

    content: RecordDict


class FederatedAdapterApp:
    """See the module docstring; constructed inside the enclave as ``Cls(config, runtime)``."""

    def __init__(self, config: dict[str, Any], runtime: Any = None, seed: bytes | None = None):
        cfg, mask_std = checked_app_config(config)
        if cfg.mode != "federated":
            raise EnclaveError("the federated adapter app needs a job with mode federated")
        try:
            self.authority = PublicIdentity.from_hex(str(config.get("authority", "")))
        except (ValueError, CryptoError):
            raise EnclaveError("the federated adapter app needs the authority's key") from None
        if runtime is None:
            raise EnclaveError("the federated adapter app needs an enclave runtime (its identity)")
        self.cfg: JobConfig = cfg
        self.runtime = runtime
        self._lock = threading.Lock()
        # The mask key is drawn here (os.urandom unless a test fixes it) and never leaves.
        self.offload = LinearOffload(MaskStream(seed), mask_std)
        self.job = build_enclave_job(cfg, self.offload)
        silo.use_local_job(cfg, self.job)
        self.check = GlobalCheck(cfg.federation)
        self.trust: SiloTrust | None = None
        self.context: Context | None = None

    def handle(
        self, method: str, meta: dict[str, Any], tensors: Tensors, ocall: OcallHandler
    ) -> tuple[dict[str, Any], Tensors]:
        """Answer one call from the host (see the module docstring)."""
        with self._lock:
            self.offload.ocall = ocall
            try:
                if method == "enroll":
                    return self._enroll(tensors), {}
                if method == "stage":
                    return self._stage(meta, tensors)
                raise EnclaveError(
                    f"the federated adapter app has no method {method!r} (enroll, stage)"
                )
            finally:
                self.offload.ocall = None
                self.offload.forget()

    def _enroll(self, tensors: Tensors) -> dict[str, Any]:
        if self.trust is not None:
            raise EnclaveError("this enclave is already enrolled; a roster is accepted once")
        text = take_bytes(tensors, "enrollment")
        statement = enrollment_statement(self.runtime.measurement, text)
        self.authority.verify(take_bytes(tensors, "signature"), statement)
        enrollment = Enrollment.from_json(text.decode("utf-8"), source="the relayed enrollment")
        name = enrollment.name_of(self.runtime.identity.public)
        match = _NAME.fullmatch(name)
        silos = self.cfg.federation.silos
        if match is None or not 0 <= int(match.group(1)) < silos:
            raise EnclaveError(f"enrolled as {name!r}; expected silo-0 .. silo-{silos - 1}")
        partition = int(match.group(1))
        self.trust = SiloTrust(self.runtime.identity, enrollment)
        self.context = Context(
            run_id=0,
            node_id=partition,
            node_config={"partition-id": partition},
            state=RecordDict(),
            run_config={},
        )
        return {"name": name, "partition": partition}

    def _stage(self, meta: dict[str, Any], tensors: Tensors) -> tuple[dict[str, Any], Tensors]:
        if self.trust is None or self.context is None:
            raise EnclaveError("this enclave is not enrolled yet; no stage runs before enroll")
        action = meta.get("action")
        if action not in silo.ACTIONS:
            raise EnclaveError(f"unknown silo stage {action!r}; expected one of {silo.ACTIONS}")
        content = decode_records(meta, tensors)
        if action == silo.HE_TRAIN:
            conf = get_config(content)
            global_vec = get_vector(content, "arrays", "global", np.float32)
            self.check.trained_from(int(conf["round"]), global_vec)  # type: ignore[arg-type]
        # This enclave's model; several apps share one process only when tests run them here.
        silo.use_local_job(self.cfg, self.job)
        message = _Relayed(content)
        reply = silo.handle(self.cfg, action, message, self.context, self.trust)  # type: ignore[arg-type]
        if action == silo.HE_DECRYPT:
            _, round_id, items = unpack_contributions(get_bytes(content, "arrays", "request"))
            total = get_vector(reply, "arrays", "sum", np.float32)
            self.check.decrypted(round_id, total, [item.weight for item in items])
        out_meta, out_values = encode_records(reply)
        out_meta["cost"] = self.offload.take_stats().as_dict()
        return out_meta, out_values
