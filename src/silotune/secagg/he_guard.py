"""Homomorphic aggregation that an active coordinator cannot turn into single-update decryption.

Every silo signs its ciphertext (its SHA-256), its example count and the weight it encrypted under,
for this job and round. A key-holding silo decrypts only through :class:`DecryptionGuard`, which

* accepts at least ``min_silos`` contributions signed by distinct enrolled silos, each a fresh
  single-term ciphertext, no two alike;
* checks that the weights are those of one weighting (``w_i / n_i`` the same for every silo, or
  all equal) and sum to at most 1, with every example count within the silos' agreed bound;
* recomputes the sum itself from those ciphertexts (what the coordinator "aggregated" is never
  decrypted), decrypts at most once per job and round, checks the result is finite and within
  ``n x clip``, and signs it.

So a coordinator that pads one silo's ciphertext with encryptions of zero, asks twice, replays an
old round, forges a weight or submits its own ciphertext is refused with an error naming what was
detected. With ``he_decrypters: 2`` two holders decrypt and the coordinator compares their signed
sums, so one lying decrypter is caught (which of the two lied is not decided).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from silotune.crypto import he, statements
from silotune.crypto.exceptions import AuthenticationError
from silotune.crypto.identity import Enrollment, IdentityKey
from silotune.secagg import wire
from silotune.secagg.masking_silo import ProtocolViolation
from silotune.secagg.policy import SiloPolicy

__all__ = [
    "Contribution",
    "DecryptionGuard",
    "pack_contributions",
    "unpack_contributions",
    "verify_sum",
]

log = logging.getLogger(__name__)
PURPOSE_CONTRIBUTION = "secagg/he/contribution"
PURPOSE_SUM = "secagg/he/sum"
STAGE_DECRYPT = "he_decrypt"
MAX_CIPHERTEXT = 1 << 31


@dataclass(frozen=True)
class Contribution:
    """One silo's signed encrypted update for one round."""

    name: str
    ciphertext: bytes
    examples: int
    weight: float
    signature: bytes

    def signed_fields(self) -> dict[str, statements.Field]:
        return {
            "name": self.name,
            "ciphertext": hashlib.sha256(self.ciphertext).digest(),
            "examples": self.examples,
            "weight": repr(float(self.weight)),
        }

    @classmethod
    def sign(
        cls,
        identity: IdentityKey | None,
        job: bytes,
        round_id: int,
        name: str,
        ciphertext: bytes,
        examples: int,
        weight: float,
    ) -> Contribution:
        """This silo's contribution (unsigned when it has no identity: unauthenticated mode)."""
        unsigned = cls(name, bytes(ciphertext), int(examples), float(weight), b"")
        if identity is None:
            return unsigned
        sig = statements.sign(
            identity, PURPOSE_CONTRIBUTION, job, round_id, unsigned.signed_fields()
        )
        return cls(name, unsigned.ciphertext, unsigned.examples, unsigned.weight, sig)

    def verify(self, enrollment: Enrollment, job: bytes, round_id: int) -> None:
        statements.verify(
            enrollment.get(self.name),
            self.signature,
            PURPOSE_CONTRIBUTION,
            job,
            round_id,
            self.signed_fields(),
            f"the ciphertext of silo {self.name!r}",
        )


def pack_contributions(job: bytes, round_id: int, items: Sequence[Contribution]) -> bytes:
    """What the coordinator sends a decrypting silo: every signed contribution, ciphertexts after."""
    head = [
        {
            "name": c.name,
            "size": len(c.ciphertext),
            "examples": c.examples,
            "weight": c.weight,
            "signature": c.signature.hex(),
        }
        for c in items
    ]
    fields = {"job": job.hex(), "round": round_id, "items": head}
    return wire.pack(STAGE_DECRYPT, fields, b"".join(c.ciphertext for c in items))


def unpack_contributions(data: bytes) -> tuple[bytes, int, list[Contribution]]:
    """Inverse of :func:`pack_contributions`: (job, round, contributions)."""
    reader, payload = wire.unpack(data, STAGE_DECRYPT, "the decryption request")
    job = reader.blob("job", 16)
    round_id = reader.integer("round", 0, (1 << 63) - 1)
    out, offset = [], 0
    for item in reader.items("items"):
        size = item.integer("size", 1, MAX_CIPHERTEXT)
        if offset + size > len(payload):
            raise wire.MessageError("the decryption request's ciphertexts are truncated")
        weight = item.number("weight")
        out.append(
            Contribution(
                item.text("name", 64),
                payload[offset : offset + size],
                item.integer("examples", 1, 1 << 62),
                weight,
                item.blob("signature", max_size=64),
            )
        )
        offset += size
    if offset != len(payload):
        raise wire.MessageError("the decryption request has trailing bytes")
    return job, round_id, out


class DecryptionGuard:
    """A key holder's checks before it decrypts anything (see the module docstring).

    Parameters
    ----------
    policy
        This silo's own floor (min_silos, weighting, max_examples, clip).
    enrollment
        Every silo's public identity (None only in unauthenticated mode).
    history
        ``job id (hex) -> last round decrypted``, kept by the caller across rounds.
    """

    def __init__(
        self,
        policy: SiloPolicy,
        enrollment: Enrollment | None,
        history: MutableMapping[str, int],
    ) -> None:
        self.policy, self.enrollment, self.history = policy, enrollment, history

    def decrypt(
        self,
        keys: he.HeKeys,
        request: bytes,
        length: int,
        identity: IdentityKey | None,
        name: str,
    ) -> tuple[NDArray[np.float32], bytes, list[str]]:
        """Check a decryption request; return (weighted sum, signature, contributor names)."""
        job, round_id, items = unpack_contributions(request)
        last = self.history.get(job.hex())
        if last is not None and round_id <= last:
            raise ProtocolViolation(
                f"asked to decrypt round {round_id} of this job after round {last}: a second "
                "decryption per round (or a replay) is refused"
            )
        self._check(job, round_id, items)
        total = he.sum_ciphertexts(keys, [c.ciphertext for c in items])
        self.history[job.hex()] = round_id  # spent, whatever happens next
        values = he.decrypt_aggregate(keys, total, length)
        bound = len(items) * keys.params.clip * (1 + 1e-6)
        if not np.isfinite(values).all() or float(np.abs(values).max(initial=0.0)) > bound:
            raise ProtocolViolation("the decrypted sum is not finite or exceeds n x clip")
        names = sorted(c.name for c in items)
        signature = b""
        if identity is not None:
            signature = statements.sign(
                identity, PURPOSE_SUM, job, round_id, _sum_fields(name, values, names)
            )
        return values, signature, names

    def _check(self, job: bytes, round_id: int, items: list[Contribution]) -> None:
        names = [c.name for c in items]
        if len(set(names)) != len(names):
            raise ProtocolViolation(
                f"one silo appears twice among the ciphertexts: {sorted(names)}"
            )
        digests = {hashlib.sha256(c.ciphertext).digest() for c in items}
        if len(digests) != len(items):
            raise ProtocolViolation("two contributions carry the same ciphertext")
        if len(items) < self.policy.min_silos:
            raise ProtocolViolation(
                f"asked to decrypt a sum of {len(items)} ciphertexts; this silo's min_silos is "
                f"{self.policy.min_silos} (a smaller sum could be one silo's update)"
            )
        for c in items:
            if he.ciphertext_terms(c.ciphertext) != 1:
                raise ProtocolViolation(
                    f"the ciphertext of {c.name!r} declares several terms; only fresh "
                    "single-update ciphertexts are summed"
                )
            if self.enrollment is not None:
                try:
                    c.verify(self.enrollment, job, round_id)
                except AuthenticationError as exc:
                    raise ProtocolViolation(f"{exc} (forged or replayed)") from None
            self.policy.check_examples(c.examples, f"silo {c.name!r}")
        self._check_weights(items)

    def _check_weights(self, items: list[Contribution]) -> None:
        weights = [c.weight for c in items]
        if not all(math.isfinite(w) and 0 < w <= 1 for w in weights) or sum(weights) > 1 + 1e-9:
            raise ProtocolViolation(f"the weights {weights} are not a share of one total")
        if self.policy.weighting == "equal":
            ratios = weights
        else:
            ratios = [c.weight / c.examples for c in items]
        if max(ratios) > min(ratios) * (1 + 1e-9):
            raise ProtocolViolation(
                f"the silos encrypted under inconsistent weights {weights} for examples "
                f"{[c.examples for c in items]} (the coordinator weighed one silo up?)"
            )


def _sum_fields(
    name: str, values: NDArray[np.float32], names: list[str]
) -> dict[str, statements.Field]:
    return {
        "decrypter": name,
        "sum": hashlib.sha256(np.ascontiguousarray(values, dtype="<f4").tobytes()).digest(),
        "contributors": ",".join(names),
    }


def verify_sum(
    enrollment: Enrollment,
    decrypter: str,
    signature: bytes,
    job: bytes,
    round_id: int,
    values: NDArray[np.float32],
    names: list[str],
) -> None:
    """The coordinator's (or anyone's) check of a decrypter's signed sum."""
    statements.verify(
        enrollment.get(decrypter),
        signature,
        PURPOSE_SUM,
        job,
        round_id,
        _sum_fields(decrypter, values, names),
        f"the decrypted sum from {decrypter!r}",
    )
