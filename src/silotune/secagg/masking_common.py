"""What both sides of an authenticated masking round share: stages, round setup, signed adverts.

Stages of one round (the coordinator sends stage S, every silo answers stage S):

==============  ================================================  ===================================
stage           coordinator sends                                 silo answers
==============  ================================================  ===================================
``advertise``   job id, :class:`SecAggConfig`, weighting rules,   its :class:`Advert`: mask key and
                the silo's id                                     round transport key, examples,
                                                                  signed over all of the left column
``share_keys``  every accepted advert (``U1``)                    Shamir share bundles, each sealed
                                                                  to a peer and signed
``masked_input`` the bundles addressed to it and ``U2``           masked vector; senders whose
                                                                  bundle did not open (accusations)
``check``       the unmask request (survivors ``U3``, dropped)    signature over its view digest
``unmask``      at least ``threshold`` view signatures            the shares the request asks for
==============  ================================================  ===================================

A silo verifies every advert against the enrollment before it uses a key, and every view signature
before it reveals a share (the consistency round of Bonawitz et al., CCS 2017), so a coordinator
that substitutes keys or shows silos different rosters, keys or survivor sets is detected and the
round aborts before anything that could unmask one silo is revealed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from silotune.crypto import statements
from silotune.crypto.exceptions import AuthenticationError
from silotune.crypto.identity import Enrollment
from silotune.crypto.masking_wire import SecAggConfig
from silotune.crypto.x25519 import check_public_key
from silotune.secagg.wire import MessageError, Reader

__all__ = [
    "ADVERTISE",
    "CHECK",
    "MASKED_INPUT",
    "SHARE_KEYS",
    "STAGES",
    "UNMASK",
    "Advert",
    "RoundSetup",
    "check_roster",
    "describe_difference",
    "view_digest",
    "view_summary",
]

ADVERTISE, SHARE_KEYS, MASKED_INPUT, CHECK, UNMASK = (
    "advertise",
    "share_keys",
    "masked_input",
    "check",
    "unmask",
)
STAGES = (ADVERTISE, SHARE_KEYS, MASKED_INPUT, CHECK, UNMASK)
JOB_BYTES = 16
PURPOSE_ADVERT = "secagg/masking/advert"
PURPOSE_BUNDLE = "secagg/masking/bundle"
PURPOSE_VIEW = "secagg/masking/view"


@dataclass(frozen=True)
class RoundSetup:
    """The coordinator's round parameters; every advert signs their digest."""

    job: bytes
    config: SecAggConfig
    weighting: str
    max_examples: int

    def fields(self) -> dict[str, object]:
        return {
            "job": self.job.hex(),
            "config": self.config.to_bytes().decode(),
            "weighting": self.weighting,
            "max_examples": self.max_examples,
        }

    @classmethod
    def read(cls, reader: Reader) -> RoundSetup:
        job = reader.blob("job", JOB_BYTES)
        try:
            config = SecAggConfig.from_bytes(reader.text("config", 1 << 16).encode())
        except ValueError as exc:
            raise MessageError(f"{reader.what}: field 'config' is invalid: {exc}") from None
        weighting = reader.text("weighting")
        if weighting not in ("examples", "equal"):
            raise MessageError(f"{reader.what}: field 'weighting' must be examples or equal")
        return cls(job, config, weighting, reader.integer("max_examples", 1, 1 << 62))

    def digest(self) -> bytes:
        return statements.digest(json.dumps(self.fields(), sort_keys=True).encode())


@dataclass(frozen=True)
class Advert:
    """One silo's signed keys for one round."""

    sid: int
    name: str
    mask_pk: bytes
    transport_pk: bytes
    examples: int
    signature: bytes

    def fields(self) -> dict[str, object]:
        return {
            "sid": self.sid,
            "name": self.name,
            "mask_pk": self.mask_pk.hex(),
            "transport_pk": self.transport_pk.hex(),
            "examples": self.examples,
            "signature": self.signature.hex(),
        }

    @classmethod
    def read(cls, reader: Reader) -> Advert:
        sid = reader.integer("sid", 0, (1 << 63) - 1)
        return cls(
            sid,
            reader.text("name", 64),
            check_public_key(reader.blob("mask_pk", 32), f"mask key of silo {sid}"),
            check_public_key(reader.blob("transport_pk", 32), f"transport key of silo {sid}"),
            reader.integer("examples", 0, 1 << 62),
            reader.blob("signature", max_size=64),
        )

    def signed_fields(self, setup: RoundSetup) -> dict[str, statements.Field]:
        return {
            "sid": self.sid,
            "name": self.name,
            "mask_pk": self.mask_pk,
            "transport_pk": self.transport_pk,
            "examples": self.examples,
            "setup": setup.digest(),
        }

    def verify(self, setup: RoundSetup, enrollment: Enrollment | None) -> None:
        """Check the advert against the round and (when given) the enrollment.

        Raises
        ------
        AuthenticationError, UnknownIdentityError
            If the name is not enrolled or the signature does not cover these keys, this round
            and this setup (a substituted key, a replayed advert, a silo shown another config).
        MessageError
            If the id is not in the round or the example count is out of the allowed range.
        """
        if self.sid not in setup.config.silo_ids:
            raise MessageError(f"the advert of silo {self.sid} names an id outside the round")
        if not 1 <= self.examples <= setup.max_examples:
            raise MessageError(
                f"silo {self.sid} ({self.name!r}) claims {self.examples} examples; allowed "
                f"1..{setup.max_examples} (max_examples)"
            )
        if enrollment is None:
            return
        statements.verify(
            enrollment.get(self.name),
            self.signature,
            PURPOSE_ADVERT,
            setup.job,
            setup.config.round_id,
            self.signed_fields(setup),
            f"the keys of silo {self.sid} ({self.name!r}), substituted or replayed?",
        )


def check_roster(adverts: dict[int, Advert]) -> None:
    """One advert per id and one id per enrolled name (no silo presented as several)."""
    names = [a.name for a in adverts.values()]
    if len(set(names)) != len(names):
        raise AuthenticationError("one silo identity is presented as several silos of the round")
    for sid, advert in adverts.items():
        if advert.sid != sid:
            raise MessageError(f"the advert listed under silo {sid} is for silo {advert.sid}")


def view_digest(setup: RoundSetup, adverts: dict[int, Advert], request: bytes) -> bytes:
    """What a silo signs before revealing shares: the round, every key it used, the survivors."""
    keys = json.dumps({str(s): adverts[s].fields() for s in sorted(adverts)}, sort_keys=True)
    return statements.digest(setup.digest(), keys.encode(), request)


def view_summary(
    adverts: dict[int, Advert], survivors: list[int], dropped: list[int]
) -> dict[str, Any]:
    """A readable account of a view, sent beside its signature so a mismatch can be named."""
    return {
        "keys": {
            str(s): statements.digest(adverts[s].mask_pk, adverts[s].transport_pk).hex()[:16]
            for s in sorted(adverts)
        },
        "survivors": sorted(survivors),
        "dropped": sorted(dropped),
    }


def describe_difference(mine: dict[str, Any], theirs: object) -> str:
    """Name what differs between this silo's view summary and a peer's (as the peer sent it)."""
    other = theirs if isinstance(theirs, dict) else {}
    parts = []
    for key in ("survivors", "dropped"):
        if other.get(key) != mine[key]:
            parts.append(f"{key} {other.get(key)} where this silo saw {mine[key]}")
    raw = other.get("keys")
    keys: dict[str, Any] = raw if isinstance(raw, dict) else {}
    if keys != mine["keys"]:
        if sorted(keys) != sorted(mine["keys"]):
            parts.append(f"the silos {sorted(keys)} where this silo saw {sorted(mine['keys'])}")
        else:
            changed = [s for s in sorted(mine["keys"]) if mine["keys"][s] != keys[s]]
            parts.append(f"other keys for silos {changed}")
    return "; ".join(parts) or "a different round setup"
