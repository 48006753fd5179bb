"""The silo's side of an authenticated masking round: it trusts nothing the coordinator relays.

Before it uses a key, a silo checks that an enrolled peer signed it for this job, round and setup;
before it reveals a share, it checks that at least ``threshold`` silos signed the same view of the
round (keys, survivors, dropped). Every failed check raises with a message that says what was
detected; nothing that could unmask this silo's update has left it at that point.

Bytes in, bytes out: any carrier (Flower messages, a split session, the benchmark's loop) moves the
messages. :meth:`MaskingSilo.export_state` / :meth:`restore` keep a round across processes.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import MutableMapping
from dataclasses import replace
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from numpy.typing import ArrayLike

from silotune.crypto import box, statements
from silotune.crypto.exceptions import AuthenticationError, CryptoError, KeyMaterialError
from silotune.crypto.identity import Enrollment, IdentityKey
from silotune.crypto.masking import MaskingClient
from silotune.crypto.masking_wire import parse_unmask_request
from silotune.errors import ProtocolViolation
from silotune.secagg import wire
from silotune.secagg.masking_common import (
    ADVERTISE,
    CHECK,
    MASKED_INPUT,
    PURPOSE_ADVERT,
    PURPOSE_BUNDLE,
    PURPOSE_VIEW,
    SHARE_KEYS,
    UNMASK,
    Advert,
    RoundSetup,
    check_roster,
    describe_difference,
    view_digest,
    view_summary,
)
from silotune.secagg.policy import PolicyError, SiloPolicy

__all__ = ["MaskingSilo", "ProtocolViolation"]

log = logging.getLogger(__name__)
_BOX_PURPOSE = b"secagg-masking-bundle|"


class MaskingSilo:
    """One silo's part in one round.

    Parameters
    ----------
    policy
        The silo's own floor (method, min_silos, clip, weighting, max_examples).
    identity, enrollment
        The silo's Ed25519 key and every silo's public identity; both None only when the
        policy is unauthenticated (``allow_unauthenticated``).
    name
        The silo's enrolled name.
    history
        ``job id (hex) -> last round`` this silo contributed to, kept by the caller across rounds:
        a round id at or below it is refused (no second masked upload for one round).
    """

    def __init__(
        self,
        policy: SiloPolicy,
        identity: IdentityKey | None,
        enrollment: Enrollment | None,
        name: str,
        history: MutableMapping[str, int] | None = None,
    ) -> None:
        if policy.authenticated and (identity is None or enrollment is None):
            raise PolicyError(
                "secure aggregation needs this silo's identity key and the enrollment "
                "(or allow_unauthenticated: true)"
            )
        self.policy, self.identity, self.enrollment = policy, identity, enrollment
        self.name = name
        self.history = history if history is not None else {}
        self.stage: str | None = None
        self.setup: RoundSetup | None = None
        self.sid = 0
        self.adverts: dict[int, Advert] = {}
        self.weight = 0.0
        self._client: MaskingClient | None = None
        self._transport: X25519PrivateKey | None = None
        self._u2: list[int] = []
        self._request = b""
        self._accused: list[int] = []

    # ------------------------------------------------------------------ stages

    def handle(self, stage: str, message: bytes, **kwargs: Any) -> bytes:
        """Answer one stage message (``examples=`` with advertise, ``update=`` with masked_input)."""
        if stage == ADVERTISE:
            return self.advertise(message, kwargs["examples"])
        if stage == SHARE_KEYS:
            return self.share_keys(message)
        if stage == MASKED_INPUT:
            return self.masked_input(message, kwargs["update"])
        if stage == CHECK:
            return self.check(message)
        if stage == UNMASK:
            return self.unmask(message)
        raise ValueError(f"Unknown stage: {stage!r}")

    def _enter(self, previous: str | None, stage: str) -> RoundSetup:
        if self.stage != previous:
            raise ProtocolViolation(
                f"stage {stage!r} arrived after {self.stage!r}; it must follow {previous!r}"
            )
        self.stage = stage
        assert self.setup is not None or stage == ADVERTISE
        return self.setup  # type: ignore[return-value]

    def advertise(self, message: bytes, examples: int) -> bytes:
        """Check the round setup against this silo's policy; answer with signed fresh keys."""
        self._enter(None, ADVERTISE)
        reader, _ = wire.unpack(message, ADVERTISE, "the round setup")
        setup = RoundSetup.read(reader)
        self.sid = reader.integer("sid", 0, (1 << 63) - 1)
        config, policy = setup.config, self.policy
        if self.sid not in config.silo_ids:
            raise ProtocolViolation(f"the round setup gives this silo id {self.sid}, not a member")
        if len(config.silo_ids) < policy.min_silos:
            raise PolicyError(
                f"the round has {len(config.silo_ids)} silos; this silo's min_silos is "
                f"{policy.min_silos}"
            )
        if config.clip != policy.clip or setup.weighting != policy.weighting:
            raise PolicyError(
                f"the round uses clip {config.clip} and weighting {setup.weighting!r}; this "
                f"silo's config says {policy.clip} and {policy.weighting!r}"
            )
        if setup.max_examples > policy.max_examples:
            raise PolicyError(
                f"the round allows {setup.max_examples} examples per silo; this silo allows at "
                f"most {policy.max_examples}"
            )
        last = self.history.get(setup.job.hex())
        if last is not None and config.round_id <= last:
            raise ProtocolViolation(
                f"the coordinator replays round {config.round_id} of this job; this silo already "
                f"took part in round {last} (a second upload for one round could unmask it)"
            )
        policy.check_examples(examples, "this silo")
        self.setup = setup
        self._client = MaskingClient(self.sid)
        self._client.setup(config.to_bytes())
        self._transport = box.new_transport_key()  # fresh every round, like the mask key
        transport_pk = box.public_bytes(self._transport)
        advert = Advert(self.sid, self.name, self._client.public_key, transport_pk, examples, b"")
        signature = b""
        if self.identity is not None:
            signature = statements.sign(
                self.identity,
                PURPOSE_ADVERT,
                setup.job,
                config.round_id,
                advert.signed_fields(setup),
            )
        advert = replace(advert, signature=signature)
        self.adverts = {self.sid: advert}
        return wire.pack(ADVERTISE, {"advert": advert.fields()})

    def share_keys(self, message: bytes) -> bytes:
        """Verify every peer's advert; answer with signed share bundles sealed to each peer."""
        setup = self._enter(ADVERTISE, SHARE_KEYS)
        reader, _ = wire.unpack(message, SHARE_KEYS, "the key broadcast")
        adverts = {sid: Advert.read(r) for sid, r in reader.table("adverts").items()}
        check_roster(adverts)
        mine = self.adverts[self.sid]
        if adverts.get(self.sid) != mine:
            raise ProtocolViolation(
                "the key broadcast does not carry this silo's own keys unchanged (substituted?)"
            )
        self._need_silos(len(adverts), "silos in the key broadcast")
        for advert in adverts.values():
            self._verify_advert(advert)
        self.adverts = adverts
        counts = [a.examples for a in adverts.values()]
        self.weight = self.policy.weight(mine.examples, counts)
        assert self._client is not None and self._transport is not None
        bundles = self._client.share_keys_verified({s: a.mask_pk for s, a in adverts.items()})
        out = {}
        for peer, bundle in bundles.items():
            sealed = box.seal(
                self._transport,
                adverts[peer].transport_pk,
                _BOX_PURPOSE + setup.job,
                setup.config.round_id,
                bundle,
            )
            out[str(peer)] = {"sealed": sealed.hex(), "signature": self._sign_bundle(peer, sealed)}
        return wire.pack(SHARE_KEYS, {"bundles": out})

    def masked_input(self, message: bytes, update: ArrayLike) -> bytes:
        """Open the routed bundles; answer with ``encode(weight * update) + masks``.

        A bundle that is signed by its sender but does not open is reported in ``accused`` (its
        sender is then left out of the round); this silo still masks with that sender.
        """
        setup = self._enter(SHARE_KEYS, MASKED_INPUT)
        reader, _ = wire.unpack(message, MASKED_INPUT, "the routed bundles")
        u2 = reader.ids("u2")
        routed = reader.table("bundles")
        if self.sid not in u2 or not set(u2) <= set(self.adverts):
            raise ProtocolViolation(f"the coordinator's U2 {sorted(u2)} is not a subset of U1")
        if set(routed) != set(u2) - {self.sid}:
            raise ProtocolViolation(
                f"the coordinator lists {sorted(set(u2) - {self.sid})} as sharing keys but routed "
                f"bundles from {sorted(routed)}"
            )
        self._need_silos(len(u2), "silos that shared keys")
        assert self._client is not None and self._transport is not None
        opened, accused = {}, []
        for sender, entry in routed.items():
            sealed = entry.blob("sealed", max_size=4096)
            self._verify_bundle(sender, sealed, entry.blob("signature", max_size=64))
            try:
                bundle = box.open_sealed(
                    self._transport,
                    self.adverts[sender].transport_pk,
                    _BOX_PURPOSE + setup.job,
                    setup.config.round_id,
                    sealed,
                    f"the share bundle from silo {sender}",
                )
                self._client.open_bundle(sender, bundle)
                opened[sender] = bundle
            except (CryptoError, ValueError) as exc:  # signed by its sender: the sender cheated
                log.warning("Secure aggregation: %s; accusing silo %d.", exc, sender)
                accused.append(sender)
        vector = np.asarray(update, dtype=np.float64).reshape(-1)
        if not np.isfinite(vector).all():
            raise CryptoError("this silo's update holds NaN or infinite values")
        try:
            masked = self._client.masked_update(
                opened, (vector * self.weight).astype(np.float32), u2
            )
        except CryptoError as exc:  # a bundle whose content is malformed: same as unopenable
            raise ProtocolViolation(f"a routed share bundle is malformed: {exc}") from None
        self._u2, self._accused = sorted(u2), sorted(accused)
        self.history[setup.job.hex()] = setup.config.round_id
        return wire.pack(MASKED_INPUT, {"accused": self._accused}, masked)

    def check(self, message: bytes) -> bytes:
        """Sign this silo's view of the round (keys, survivors, dropped)."""
        setup = self._enter(MASKED_INPUT, CHECK)
        reader, _ = wire.unpack(message, CHECK, "the unmask request")
        request = reader.blob("request", max_size=1 << 16)
        try:
            survivors, dropped = parse_unmask_request(request, setup.config)
        except CryptoError as exc:
            raise ProtocolViolation(f"the unmask request is malformed: {exc}") from None
        if set(survivors) & set(dropped) or not set(survivors) | set(dropped) <= set(self._u2):
            raise ProtocolViolation(
                f"the unmask request (survivors {survivors}, dropped {dropped}) does not split "
                f"this silo's U2 {self._u2}"
            )
        if self.sid not in survivors:
            raise ProtocolViolation("the unmask request does not list this silo as a survivor")
        self._need_silos(len(survivors), "surviving silos")
        self._request = request
        fields: dict[str, statements.Field] = {"sid": self.sid, "view": self._view_digest()}
        signature = b""
        if self.identity is not None:
            signature = statements.sign(
                self.identity, PURPOSE_VIEW, setup.job, setup.config.round_id, fields
            )
        summary = view_summary(self.adverts, survivors, dropped)
        return wire.pack(CHECK, {"signature": signature.hex(), "summary": summary})

    def unmask(self, message: bytes) -> bytes:
        """Reveal shares only if ``threshold`` survivors signed the same view as this silo."""
        setup = self._enter(CHECK, UNMASK)
        reader, _ = wire.unpack(message, UNMASK, "the view signatures")
        survivors, dropped = parse_unmask_request(self._request, setup.config)
        signed = reader.table("views")
        mine = view_summary(self.adverts, survivors, dropped)
        good = []
        for sid, entry in signed.items():
            if sid not in survivors:
                raise ProtocolViolation(f"a view signature comes from silo {sid}, not a survivor")
            signature = entry.blob("signature", max_size=64)
            if self.enrollment is not None:
                fields: dict[str, statements.Field] = {"sid": sid, "view": self._view_digest()}
                try:
                    statements.verify(
                        self.enrollment.get(self.adverts[sid].name),
                        signature,
                        PURPOSE_VIEW,
                        setup.job,
                        setup.config.round_id,
                        fields,
                        f"view of silo {sid}",
                    )
                except AuthenticationError:
                    what = describe_difference(mine, entry.doc.get("summary"))
                    raise ProtocolViolation(
                        f"inconsistent views: silo {sid} ({self.adverts[sid].name!r}) signed a "
                        f"different view of round {setup.config.round_id} ({what}); the "
                        "coordinator showed silos different rosters or keys. No share revealed."
                    ) from None
            good.append(sid)
        if len(good) < setup.config.threshold:
            raise ProtocolViolation(
                f"only {len(good)} silos confirmed the view of the round; the threshold is "
                f"{setup.config.threshold}. No share revealed."
            )
        assert self._client is not None
        return wire.pack(UNMASK, {}, self._client.unmask(self._request))

    # ------------------------------------------------------------------ checks

    def _need_silos(self, count: int, what: str) -> None:
        setup = self.setup
        assert setup is not None
        floor = max(setup.config.threshold, self.policy.min_silos)
        if count < floor:
            raise ProtocolViolation(
                f"only {count} {what}; this silo needs at least {floor} (threshold "
                f"{setup.config.threshold}, min_silos {self.policy.min_silos})"
            )

    def _verify_advert(self, advert: Advert) -> None:
        assert self.setup is not None
        try:
            advert.verify(self.setup, self.enrollment)
        except wire.MessageError as exc:
            raise ProtocolViolation(str(exc)) from None
        except (AuthenticationError, KeyMaterialError) as exc:
            raise ProtocolViolation(f"key substitution detected: {exc}") from None
        self.policy.check_examples(advert.examples, f"silo {advert.sid} ({advert.name!r})")

    def _sign_bundle(self, peer: int, sealed: bytes) -> str:
        if self.identity is None:
            return ""
        setup = self.setup
        assert setup is not None
        fields: dict[str, statements.Field] = {
            "sender": self.sid,
            "recipient": peer,
            "sealed": statements.digest(sealed),
        }
        return statements.sign(
            self.identity, PURPOSE_BUNDLE, setup.job, setup.config.round_id, fields
        ).hex()

    def _verify_bundle(self, sender: int, sealed: bytes, signature: bytes) -> None:
        if self.enrollment is None:
            return
        setup = self.setup
        assert setup is not None
        fields: dict[str, statements.Field] = {
            "sender": sender,
            "recipient": self.sid,
            "sealed": statements.digest(sealed),
        }
        try:
            statements.verify(
                self.enrollment.get(self.adverts[sender].name),
                signature,
                PURPOSE_BUNDLE,
                setup.job,
                setup.config.round_id,
                fields,
                f"the share bundle from silo {sender}",
            )
        except AuthenticationError as exc:
            raise ProtocolViolation(f"{exc} (the coordinator changed or swapped it)") from None

    def _view_digest(self) -> bytes:
        assert self.setup is not None
        return view_digest(self.setup, self.adverts, self._request)

    # ------------------------------------------------------------------ state

    def export_state(self) -> bytes:
        """The round's secret state as JSON (keep it on the silo; never send it)."""
        doc = {
            "stage": self.stage,
            "setup": self.setup.fields() if self.setup is not None else None,
            "sid": self.sid,
            "adverts": {str(s): a.fields() for s, a in self.adverts.items()},
            "weight": self.weight,
            "client": self._client.export_state().decode() if self._client else None,
            "transport": (
                self._transport.private_bytes_raw().hex() if self._transport is not None else None
            ),
            "u2": self._u2,
            "request": self._request.hex(),
            "accused": self._accused,
        }
        return json.dumps(doc).encode()

    @classmethod
    def restore(
        cls,
        data: bytes,
        policy: SiloPolicy,
        identity: IdentityKey | None,
        enrollment: Enrollment | None,
        name: str,
        history: MutableMapping[str, int] | None = None,
    ) -> MaskingSilo:
        """Rebuild a silo's round from :meth:`export_state`."""
        silo = cls(policy, identity, enrollment, name, history)
        try:
            doc = json.loads(bytes(data).decode())
            silo.stage = doc["stage"]
            if doc["setup"] is not None:
                silo.setup = RoundSetup.read(wire.Reader(doc["setup"], "saved round"))
            silo.sid = int(doc["sid"])
            silo.adverts = {
                int(s): Advert.read(wire.Reader(a, "saved advert"))
                for s, a in doc["adverts"].items()
            }
            silo.weight = float(doc["weight"])
            if doc["client"] is not None:
                silo._client = MaskingClient.restore_state(doc["client"].encode())
            if doc["transport"] is not None:
                silo._transport = X25519PrivateKey.from_private_bytes(
                    bytes.fromhex(doc["transport"])
                )
            silo._u2 = [int(x) for x in doc["u2"]]
            silo._request = bytes.fromhex(doc["request"])
            silo._accused = [int(x) for x in doc["accused"]]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise KeyMaterialError(f"saved secure-aggregation state is malformed: {exc}") from None
        return silo


def new_job_id() -> bytes:
    """A fresh random job id (bound into every signature of the job)."""
    return secrets.token_bytes(16)
