"""The coordinator's side of an authenticated masking round: one stage driver for every carrier.

The driver is a state machine over :data:`~silotune.secagg.masking_common.STAGES`: a carrier
(Flower messages, split sessions, the benchmark's in-memory loop) sends :meth:`MaskingDriver.
messages`, hands each reply to :meth:`receive` (or a transport failure to :meth:`drop`), then calls
:meth:`advance`. A silo whose reply is missing, malformed or fails a check is dropped from the
round with a log line naming it and the reason; the round goes on while enough silos remain, and
otherwise raises :class:`RoundFailed`. No reply from one silo can end the job by itself.

The coordinator only routes, adds masked uint32 vectors and removes masks with the shares the
protocol reveals. What it can and cannot do against the silos' checks is in docs/federated.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
from numpy.typing import NDArray

from silotune.crypto import statements
from silotune.crypto.exceptions import CryptoError
from silotune.crypto.identity import Enrollment
from silotune.crypto.masking import MaskingServer
from silotune.crypto.masking_wire import KIND_MASKED, SecAggConfig, unpack_message
from silotune.errors import RoundFailed, SilotuneError
from silotune.secagg import wire
from silotune.secagg.masking_common import (
    ADVERTISE,
    CHECK,
    MASKED_INPUT,
    PURPOSE_BUNDLE,
    PURPOSE_VIEW,
    SHARE_KEYS,
    STAGES,
    UNMASK,
    Advert,
    RoundSetup,
    view_digest,
)

__all__ = ["MaskingDriver", "MaskingResult", "RoundFailed", "run_round"]

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Hashable)


@dataclass
class MaskingResult(Generic[M]):
    """A finished round: the weighted mean over the contributors and what happened to the rest."""

    mean: NDArray[np.float32]  # (L,) weighted mean of the contributors' updates
    contributors: list[M]
    dropped: dict[M, str]
    examples: dict[M, int]  # signed example counts of the contributors
    upload_bytes: float  # mean size of one masked upload


class MaskingDriver(Generic[M]):
    """One round, coordinator side.

    Parameters
    ----------
    job
        16-byte job id, bound into every signature of the job.
    round_id
        Round number (a silo refuses one it already took part in).
    members
        The carrier's handles of the round's silos (Flower node ids, split silo names).
    length, clip, threshold
        Vector length, fixed-point clip, Shamir threshold (default: a majority).
    weighting, max_examples
        ``examples`` or ``equal``; the most examples one silo may claim.
    min_silos
        Fewest contributors a round may end with (besides the threshold).
    enrollment
        Every silo's public identity; with it the coordinator drops silos whose adverts, bundles
        or views do not verify. The silos check everything themselves either way.
    """

    def __init__(
        self,
        job: bytes,
        round_id: int,
        members: Sequence[M],
        length: int,
        clip: float,
        *,
        threshold: int | None = None,
        weighting: str = "examples",
        max_examples: int = 1_000_000,
        min_silos: int = 2,
        enrollment: Enrollment | None = None,
    ) -> None:
        ordered = sorted(members)  # type: ignore[type-var]
        self.sid: dict[M, int] = {m: i + 1 for i, m in enumerate(ordered)}
        self.member: dict[int, M] = {i: m for m, i in self.sid.items()}
        k = len(ordered)
        try:
            config = SecAggConfig(
                round_id, tuple(self.sid.values()), threshold or k // 2 + 1, length, clip
            )
        except ValueError as exc:
            raise RoundFailed(f"secure aggregation round {round_id} cannot start: {exc}") from None
        self.setup = RoundSetup(job, config, weighting, max_examples)
        self.server = MaskingServer(config)
        self.min_silos = max(min_silos, config.threshold)
        self.enrollment = enrollment
        self.stage = ADVERTISE
        self.active: set[M] = set(ordered)
        self.dropped: dict[M, str] = {}
        self.adverts: dict[int, Advert] = {}
        self.done = False
        self._replies: dict[M, bytes] = {}
        self._outbox: dict[M, bytes] = {
            m: wire.pack(ADVERTISE, {**self.setup.fields(), "sid": self.sid[m]}) for m in ordered
        }
        self._uploads: dict[int, int] = {}
        self._request = b""
        self._views: dict[int, dict[str, object]] = {}
        self._result: MaskingResult[M] | None = None

    @property
    def config(self) -> SecAggConfig:
        return self.setup.config

    def messages(self) -> dict[M, bytes]:
        """The current stage's message for each silo still in the round."""
        return {m: msg for m, msg in self._outbox.items() if m in self.active}

    def receive(self, member: M, reply: object) -> None:
        """Record one silo's reply to the current stage (checked in :meth:`advance`)."""
        if member in self.active and member in self._outbox:
            if not isinstance(reply, (bytes, bytearray)):
                self.drop(member, f"its {self.stage} reply is not bytes")
            else:
                self._replies[member] = bytes(reply)

    def drop(self, member: M, reason: str) -> None:
        """Leave ``member`` out of the rest of the round (it failed, vanished or cheated)."""
        if member not in self.active:
            return
        self.active.discard(member)
        if self.sid[member] in self._uploads and self.stage in (CHECK, UNMASK):
            log.warning(
                "Secure aggregation round %d: silo %s missed stage %s (%s); its masked update "
                "still counts (its self mask is rebuilt from the others' shares)",
                self.config.round_id,
                member,
                self.stage,
                reason,
            )
            return
        self.dropped[member] = f"{self.stage}: {reason}"
        log.warning(
            "Secure aggregation round %d: silo %s dropped at stage %s: %s",
            self.config.round_id,
            member,
            self.stage,
            reason,
        )

    def advance(self) -> None:
        """Check the stage's replies, then prepare the next stage (or finish the round)."""
        stage = self.stage
        for member in sorted(self.active - set(self._replies)):  # type: ignore[type-var]
            self.drop(member, "no reply")
        replies, self._replies = self._replies, {}
        step: dict[str, Callable[[dict[M, bytes]], None]] = {
            ADVERTISE: self._adverts,
            SHARE_KEYS: self._bundles,
            MASKED_INPUT: self._masked,
            CHECK: self._views_in,
            UNMASK: self._reveals,
        }
        step[stage](replies)
        if not self.done:
            self.stage = STAGES[STAGES.index(stage) + 1]

    def result(self) -> MaskingResult[M]:
        if self._result is None:
            raise RoundFailed("the round has not finished")
        return self._result

    # ------------------------------------------------------------------ stages

    def _each(self, replies: Mapping[M, bytes], parse: Callable[[M, bytes], None]) -> None:
        for member, reply in replies.items():
            if member not in self.active:
                continue
            try:
                parse(member, reply)
            except (CryptoError, SilotuneError, ValueError) as exc:
                self.drop(member, str(exc))

    def _need(self, count: int, what: str, floor: int | None = None) -> None:
        floor = self.min_silos if floor is None else floor
        if count < floor:
            raise RoundFailed(
                f"round {self.config.round_id} failed: only {count} {what}; secure aggregation "
                f"needs {floor} (threshold {self.config.threshold}, min_silos {self.min_silos})"
            )

    def _adverts(self, replies: dict[M, bytes]) -> None:
        def parse(member: M, reply: bytes) -> None:
            reader, _ = wire.unpack(reply, ADVERTISE, f"the advert of silo {member}")
            advert = Advert.read(reader.obj("advert"))
            if advert.sid != self.sid[member]:
                raise wire.MessageError(
                    f"it signed keys for id {advert.sid}, not {self.sid[member]}"
                )
            if advert.name in {a.name for a in self.adverts.values()}:
                raise wire.MessageError(f"its identity {advert.name!r} already took part")
            advert.verify(self.setup, self.enrollment)
            self.server.add_public_key(advert.sid, advert.mask_pk)
            self.adverts[advert.sid] = advert

        self._each(replies, parse)
        self._need(len(self.adverts), "silos sent valid keys")
        broadcast = wire.pack(
            SHARE_KEYS, {"adverts": {str(s): a.fields() for s, a in sorted(self.adverts.items())}}
        )
        self.server.key_broadcast()  # fixes U1 in the protocol object
        self._outbox = dict.fromkeys(self.active, broadcast)

    def _bundles(self, replies: dict[M, bytes]) -> None:
        def parse(member: M, reply: bytes) -> None:
            reader, _ = wire.unpack(reply, SHARE_KEYS, f"the share bundles of silo {member}")
            sender = self.sid[member]
            entries = reader.table("bundles")
            out = {}
            for peer, entry in entries.items():
                sealed = entry.blob("sealed", max_size=4096)
                signature = entry.blob("signature", max_size=64)
                self._check_bundle(sender, peer, sealed, signature)
                out[peer] = json.dumps(
                    {"sealed": sealed.hex(), "signature": signature.hex()}
                ).encode()
            self.server.receive_bundles(sender, out)

        self._each(replies, parse)
        shared = [m for m in self.active if m in replies]
        self._need(len(shared), "silos shared keys")
        u2 = sorted(self.sid[m] for m in shared)
        self._outbox = {}
        for member in shared:
            routed = self.server.bundles_for(self.sid[member])
            entries = {str(s): json.loads(b) for s, b in routed.items()}
            self._outbox[member] = wire.pack(MASKED_INPUT, {"u2": u2, "bundles": entries})

    def _masked(self, replies: dict[M, bytes]) -> None:
        uploads: dict[M, bytes] = {}
        accused: dict[int, int] = {}

        def parse(member: M, reply: bytes) -> None:
            reader, payload = wire.unpack(reply, MASKED_INPUT, f"the masked input of silo {member}")
            accusations = reader.ids("accused")
            sender_id, _ = unpack_message(
                payload, KIND_MASKED, self.config.round_id, "Masked upload"
            )
            if sender_id != self.sid[member]:
                raise wire.MessageError(f"its masked upload is labelled silo {sender_id}")
            for sid in accusations:
                accused.setdefault(sid, self.sid[member])
            uploads[member] = payload

        self._each(replies, parse)
        for sid, accuser in sorted(accused.items()):
            if sid in self.member:
                self.drop(
                    self.member[sid],
                    f"silo {self.member[accuser]} received a signed share bundle from it that does "
                    "not open (garbage from the sender)",
                )
        for member, payload in uploads.items():
            if member in self.active:
                try:
                    self.server.receive_masked(payload)
                    self._uploads[self.sid[member]] = len(payload)
                except CryptoError as exc:
                    self.drop(member, f"bad masked upload: {exc}")
        self._need(len(self._uploads), "silos uploaded masked inputs")
        self._request = self.server.unmask_request()
        message = wire.pack(CHECK, {"request": self._request.hex()})
        self._outbox = {self.member[s]: message for s in self._uploads}

    def _views_in(self, replies: dict[M, bytes]) -> None:
        digest = view_digest(self.setup, self.adverts, self._request)

        def parse(member: M, reply: bytes) -> None:
            reader, _ = wire.unpack(reply, CHECK, f"the view signature of silo {member}")
            signature = reader.blob("signature", max_size=64)
            sid = self.sid[member]
            if self.enrollment is not None:
                statements.verify(
                    self.enrollment.get(self.adverts[sid].name),
                    signature,
                    PURPOSE_VIEW,
                    self.setup.job,
                    self.config.round_id,
                    {"sid": sid, "view": digest},
                    f"the view of silo {member}",
                )
            self._views[sid] = {"signature": signature.hex(), "summary": reader.doc.get("summary")}

        self._each(replies, parse)
        self._need(len(self._views), "silos confirmed the round's view", self.config.threshold)
        message = wire.pack(UNMASK, {"views": {str(s): v for s, v in sorted(self._views.items())}})
        self._outbox = {self.member[s]: message for s in self._views}

    def _reveals(self, replies: dict[M, bytes]) -> None:
        def parse(member: M, reply: bytes) -> None:
            _, payload = wire.unpack(reply, UNMASK, f"the reveal of silo {member}")
            self.server.receive_reveal(payload)

        self._each(replies, parse)
        try:
            total = self.server.aggregate()  # sum over U3 of w_i x_i, float32 (L,)
        except CryptoError as exc:
            raise RoundFailed(
                f"secure aggregation round {self.config.round_id} failed: {exc}"
            ) from None
        contributors = sorted(self._uploads)
        bound = len(contributors) * self.config.clip * (1 + 1e-6)
        if not np.isfinite(total).all() or float(np.abs(total).max(initial=0.0)) > bound:
            raise RoundFailed(
                f"secure aggregation round {self.config.round_id} failed: the unmasked sum is not "
                f"finite or exceeds {len(contributors)} x clip"
            )
        counts = {s: self.adverts[s].examples for s in self.adverts}
        if self.setup.weighting == "equal":
            scale = len(counts) / len(contributors)
        else:
            scale = sum(counts.values()) / sum(counts[s] for s in contributors)
        members = [self.member[s] for s in contributors]
        self._result = MaskingResult(
            (total.astype(np.float64) * scale).astype(np.float32),
            members,
            dict(self.dropped),
            {self.member[s]: counts[s] for s in contributors},
            float(np.mean(list(self._uploads.values()))),
        )
        self.done = True

    def _check_bundle(self, sender: int, peer: int, sealed: bytes, signature: bytes) -> None:
        if self.enrollment is None:
            return
        statements.verify(
            self.enrollment.get(self.adverts[sender].name),
            signature,
            PURPOSE_BUNDLE,
            self.setup.job,
            self.config.round_id,
            {"sender": sender, "recipient": peer, "sealed": statements.digest(sealed)},
            f"its share bundle for silo {peer}",
        )


Exchange = Callable[[str, dict[M, bytes]], tuple[dict[M, bytes], dict[M, str]]]


def run_round(driver: MaskingDriver[M], exchange: Exchange[M]) -> MaskingResult[M]:
    """Drive a round to its end over ``exchange(stage, messages) -> (replies, failures)``."""
    while not driver.done:
        replies, failed = exchange(driver.stage, driver.messages())
        for member, why in failed.items():
            driver.drop(member, why)
        for member, reply in replies.items():
            driver.receive(member, reply)
        driver.advance()
    return driver.result()
