"""The split trunk as an enclave app: attests on each relayed connection, then serves the silo.

Inside the enclave the unchanged :class:`~silotune.split.trunk.TrunkService` runs with the
enclave's own identity key, so every silo's handshake, session keys and plaintext frames exist only
in the enclave process; the host relays sealed bytes. Per relayed connection:

1. the silo's attestation request (:mod:`silotune.split.attest`) is answered with a quote whose
   report data is the enclave identity's public key;
2. the silo, having verified the quote, runs the ordinary split handshake pinned to that key;
3. the trunk service serves the session as it would outside an enclave.

The measured configuration (:func:`trunk_app_config`) is the job's model, adapter, train and split
settings plus the enrollment (which silos may connect), so a host cannot let another silo in
without changing the measurement every silo checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from silotune.enclave.base import AttestationError, EnclaveError, OcallHandler, Tensors
from silotune.enclave.runtime import EnclaveRuntime
from silotune.split.attest import parse_attest_request
from silotune.transport.base import Connection, TransportError

if TYPE_CHECKING:
    from silotune.config import JobConfig
    from silotune.crypto.identity import Enrollment

__all__ = ["SEAL_LABEL", "TrunkEnclaveApp", "trunk_app_config"]

SEAL_LABEL = "trunk_adapter"
_LOCAL_SPLIT_KEYS = ("address", "keys_dir", "tls_dir", "silo_name")  # differ per machine
_BOOKKEEPING_TRAIN_KEYS = (
    "eval_every",
    "log_every",
    "eval_batch_size",
    "keep_checkpoints",
    "threads",
)


def trunk_app_config(cfg: JobConfig, enrollment: Enrollment) -> dict[str, Any]:
    """The trunk enclave's measured configuration for job ``cfg`` and its enrolled silos.

    Machine-local settings (data, output and key folders, addresses, the ``enclave`` section)
    and the silo's bookkeeping (``train.eval_every``, ``log_every``, ``eval_batch_size``,
    ``keep_checkpoints``, ``threads``) are left out: the trunk does not use them, so a silo that evaluates more
    often still computes the coordinator's measurement from the same recipe.
    """
    job = cfg.model_dump(mode="json")
    for key in ("data", "output_dir", "federation", "enclave"):
        job.pop(key, None)
    for key in _LOCAL_SPLIT_KEYS:
        job["split"].pop(key, None)
    for key in _BOOKKEEPING_TRAIN_KEYS:
        job["train"].pop(key, None)
    members = {name: enrollment.get(name).hex() for name in enrollment.names()}
    return {"job": job, "enrollment": members}


class TrunkEnclaveApp:
    """Builds the trunk service from the measured config; ``accept`` serves one relayed silo."""

    def __init__(self, config: dict[str, Any], runtime: EnclaveRuntime) -> None:
        from silotune.config import config_from_dict
        from silotune.crypto.identity import Enrollment, PublicIdentity
        from silotune.split.runner import build_service

        self.runtime = runtime
        members = config.get("enrollment")
        if not isinstance(members, dict) or not members:
            raise EnclaveError("the trunk enclave's config needs a non-empty 'enrollment'")
        enrollment = Enrollment({n: PublicIdentity.from_hex(str(k)) for n, k in members.items()})
        cfg = config_from_dict(config.get("job") or {})
        self.service = build_service(cfg, runtime.identity, enrollment)
        runtime.log.info(
            "Trunk ready inside the simulated enclave; enrolled silos: %s.",
            ", ".join(enrollment.names()),
        )

    def accept(self, connection: Connection) -> None:
        """Answer the silo's attestation request, then serve its session to the end."""
        try:
            nonce = parse_attest_request(connection.recv(self.service.timeout))
            connection.send(self.runtime.quote(nonce).to_bytes())
        except (TransportError, AttestationError) as exc:
            self.runtime.log.warning("Closed a connection before attestation: %s", exc)
            return
        self.service.handle(connection)

    def handle(
        self, method: str, meta: dict[str, Any], tensors: Tensors, ocall: OcallHandler
    ) -> tuple[dict[str, Any], Tensors]:
        """``status`` (progress and sessions) or ``seal_trunk`` (the trunk adapter, sealed)."""
        if method == "status":
            return {
                "finished": self.service.finished.is_set(),
                "commits": self.service.engine.commits,
                "records": [vars(record) for record in self.service.records],
            }, {}
        if method == "seal_trunk":
            from safetensors.torch import save

            state = self.service.engine.trunk_state()
            blob = self.runtime.seal(save(state, metadata={"format": "pt"}), SEAL_LABEL)
            return {"length": len(blob), "tensors": len(state)}, {"blob": blob}
        raise EnclaveError(f"the trunk enclave has no method {method!r}; use status or seal_trunk")
