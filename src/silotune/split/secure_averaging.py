"""Secure averaging of silo adapters in split mode: the secagg stage driver over split sessions.

The protocol is the one federated ``masking`` uses (:mod:`silotune.secagg`: signed keys, signed
share bundles, a consistency check before any share is revealed); only the carrier differs: every
stage message travels in a ``secagg`` frame on the silo's authenticated, encrypted session with
the coordinator. One round:

=================  ==========================================  ===================================
silo sends         what                                        coordinator answers
=================  ==========================================  ===================================
``hello``          vector length and clip                      ``alone`` (one live silo: keep your
                                                               adapter) or the round setup
``advertise``      its signed mask and transport keys,         every accepted advert
                   examples
``share_keys``     signed share bundles, each sealed to a      the bundles for this silo and U2
                   peer (the coordinator routes)
``masked_input``   ``encode(w_i x_i) + masks`` mod 2**32       the unmask request
``check``          its signature over its view of the round    every view signature
``unmask``         the requested shares                        ``result``: the weighted average
=================  ==========================================  ===================================

Each silo signs with its enrolled identity and checks every peer's signature against the
enrollment in ``split.keys_dir/enrollment.json`` (public keys only), so a coordinator that
substitutes keys, shows silos different rosters, or replays a round is detected and the silo
stops with an error naming what it detected; a silo whose reply is bad leaves the round, and the
others finish without it. The coordinator learns the weighted average and nothing else.

Dropouts: a round's roster is the silos live when it starts; with one live silo it is skipped.
A silo lost before uploading is left out (its pairwise masks are rebuilt from its key shares), a
silo lost after uploading stays in the average (its self mask is rebuilt). If fewer than a
majority of the roster remain, the round fails with :class:`SplitError`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray

from silotune.crypto.exceptions import CryptoError
from silotune.crypto.identity import Enrollment, IdentityKey
from silotune.crypto.masking_wire import MAX_SILOS, MAX_VECTOR_LENGTH
from silotune.errors import SilotuneError
from silotune.secagg.masking_common import ADVERTISE, STAGES
from silotune.secagg.masking_driver import MaskingDriver, RoundFailed
from silotune.secagg.masking_silo import MaskingSilo, new_job_id
from silotune.secagg.policy import SiloPolicy
from silotune.split.session import FrameSession, SplitError
from silotune.transport.frames import KIND_SECAGG, Frame, FrameError

if TYPE_CHECKING:
    from silotune.split.engines import TrunkEngine
    from silotune.split.silo import TrunkLink

__all__ = [
    "MaskedAveraging",
    "MaskingAverager",
    "flatten_state",
    "unflatten_state",
]

log = logging.getLogger(__name__)

HELLO, RESULT, DROPPED = "hello", "result", "dropped"
MIN_SILOS = 2  # an average of one adapter is that adapter


# --------------------------------------------------------------------------- encodings


def flatten_state(state: Mapping[str, torch.Tensor]) -> NDArray[np.float64]:
    """Concatenate the tensors of ``state`` in sorted-name order into one float64 vector (L,)."""
    parts = [state[name].detach().float().cpu().numpy().reshape(-1) for name in sorted(state)]
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


def unflatten_state(
    vector: NDArray[np.floating[Any]], like: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Split ``vector`` back into tensors shaped, typed and named like ``like`` (inverse of flatten)."""
    total = sum(t.numel() for t in like.values())
    if vector.shape != (total,):
        raise FrameError(f"the average holds {vector.size} values, the adapter has {total}")
    out, offset = {}, 0
    for name in sorted(like):
        ref = like[name]
        chunk = np.array(vector[offset : offset + ref.numel()], dtype=np.float32)
        out[name] = torch.from_numpy(chunk).view(ref.shape).to(dtype=ref.dtype, device=ref.device)
        offset += ref.numel()
    return out


def _blob(frame: Frame) -> bytes:
    """The stage message a ``secagg`` frame carries in its data section."""
    if not frame.data:
        raise FrameError(f"a '{KIND_SECAGG}' frame must carry its stage message as data")
    return frame.data


def _send(
    session: FrameSession,
    step: int,
    stage: str,
    data: bytes | None = None,
    meta: Mapping[str, Any] | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> None:
    info = {"stage": stage, **(meta or {})}
    session.send(KIND_SECAGG, step, dict(tensors or {}), info, data=data or b"")


def _recv(session: FrameSession, stage: str, timeout: float) -> Frame:
    frame = session.recv(timeout)
    if frame.kind != KIND_SECAGG or frame.meta.get("stage") != stage:
        got = frame.meta.get("stage") if frame.kind == KIND_SECAGG else None
        raise FrameError(
            f"expected secure-averaging stage '{stage}', got a '{frame.kind}' frame"
            + (f" of stage {got!r}" if got is not None else "")
        )
    return frame


# --------------------------------------------------------------------------- silo


class MaskingAverager:
    """:class:`~silotune.split.averaging.AdapterAverager` through authenticated secure aggregation.

    Parameters
    ----------
    link
        The silo's session with the coordinator.
    clip
        ``split.secagg_clip``: bound on each pre-weighted value (the same at every silo).
    identity, enrollment, name
        This silo's Ed25519 key, every silo's public identity, its enrolled name.
    """

    def __init__(
        self,
        link: TrunkLink,
        clip: float,
        identity: IdentityKey,
        enrollment: Enrollment,
        name: str,
    ) -> None:
        self.link = link
        self.clip = float(clip)
        self.identity, self.enrollment, self.name = identity, enrollment, name
        self.policy = SiloPolicy("masking", MIN_SILOS, self.clip)
        self.history: dict[str, int] = {}  # job -> last round this silo contributed to

    def average(
        self, step: int, state: Mapping[str, torch.Tensor], examples: int
    ) -> dict[str, torch.Tensor]:
        """Return the example-weighted average of every live silo's ``state``.

        ``examples`` is signed into this silo's keys; every silo weighs by the signed counts.

        Raises
        ------
        SplitError
            If the round fails (too few silos left, a protocol check fails, or a pre-weighted
            value exceeds ``split.secagg_clip``), naming what was detected.
        """
        if not any(t.numel() for t in state.values()):
            raise SplitError(
                "this silo has no adapter values to average; secure averaging needs at least one "
                "(or set split.secure_averaging: none)"
            )
        try:
            return self._round(step, state, examples)
        except (CryptoError, SilotuneError, ValueError) as exc:
            # Tell the coordinator at once, so the round goes on (or fails) without this silo.
            self.link.session.send_error(str(exc))
            if isinstance(exc, (FrameError, SplitError)):
                raise
            raise SplitError(f"secure averaging at step {step} failed: {exc}") from None

    def _round(
        self, step: int, state: Mapping[str, torch.Tensor], examples: int
    ) -> dict[str, torch.Tensor]:
        session, timeout, wire_step = self.link.session, self.link.timeout, self.link.step
        vector = flatten_state(state)  # (L,)
        _send(session, wire_step, HELLO, meta={"length": int(vector.size), "clip": self.clip})
        reply = _recv(session, HELLO, timeout)
        if reply.meta.get("alone") is True:
            log.info("Step %d: the only live silo; its adapter is the average.", step)
            return {name: tensor.detach().clone() for name, tensor in state.items()}
        party = MaskingSilo(self.policy, self.identity, self.enrollment, self.name, self.history)
        out, incoming = party.advertise(_blob(reply), examples), b""
        for stage, following in zip(STAGES, (*STAGES[1:], RESULT), strict=True):
            if stage != ADVERTISE:
                update = None
                if stage == "masked_input":
                    update = vector
                    peak = float(np.abs(vector * party.weight).max()) if vector.size else 0.0
                    if not math.isfinite(peak) or peak > self.clip:
                        raise SplitError(
                            f"an adapter value times its averaging weight is {peak:.4g}, outside "
                            f"split.secagg_clip {self.clip}; raise split.secagg_clip (the same "
                            "on every silo)"
                        )
                out = party.handle(stage, incoming, update=update)
            _send(session, wire_step, stage, out)
            frame = _recv_any(session, (following, DROPPED), timeout)
            if frame.meta.get("stage") == DROPPED:
                log.warning(
                    "Step %d: left out of secure averaging round (%s); keeping this silo's "
                    "adapter.",
                    step,
                    frame.meta.get("reason"),
                )
                return {name: tensor.detach().clone() for name, tensor in state.items()}
            if following == RESULT:
                return self._result(frame, state, step)
            incoming = _blob(frame)
        raise AssertionError("unreachable")

    @staticmethod
    def _result(
        frame: Frame, state: Mapping[str, torch.Tensor], step: int
    ) -> dict[str, torch.Tensor]:
        average = frame.tensors.get("average")
        if average is None or average.dtype != torch.float32 or average.dim() != 1:
            raise FrameError("the averaged adapter must be a float32 vector 'average'")
        if not bool(torch.isfinite(average).all()):
            raise FrameError("the averaged adapter holds NaN or infinite values")
        log.debug("Step %d: securely averaged over %s silos.", step, frame.meta.get("silos"))
        return unflatten_state(average.numpy(), state)


def _recv_any(session: FrameSession, stages: tuple[str, ...], timeout: float) -> Frame:
    frame = session.recv(timeout)
    if frame.kind != KIND_SECAGG or frame.meta.get("stage") not in stages:
        got = frame.meta.get("stage") if frame.kind == KIND_SECAGG else None
        raise FrameError(
            f"expected secure-averaging stage {stages[0]!r}, got a '{frame.kind}' frame"
            + (f" of stage {got!r}" if got is not None else "")
        )
    return frame


# --------------------------------------------------------------------------- coordinator


class MaskedAveraging:
    """The coordinator's side of secure averaging: routes stages, sums, never sees an adapter.

    One per :class:`~silotune.split.trunk.TrunkService`; each silo's session thread calls
    :meth:`serve` when its ``hello`` arrives. Stages meet at the engine's roster (one rendezvous
    per stage); the last silo to arrive advances the shared :class:`MaskingDriver`.

    Parameters
    ----------
    engine
        The trunk engine: its roster (live silos, rendezvous) and its ``after_sync``.
    enrollment
        The silos' public identities (the coordinator drops silos whose signatures fail).
    """

    def __init__(self, engine: TrunkEngine, enrollment: Enrollment | None = None) -> None:
        self.engine = engine
        self.enrollment = enrollment
        self.job = new_job_id()
        self.rounds = 0  # SecAgg round ids (bound into every message and mask stream)

    def serve(self, session: FrameSession, member: str, hello: Frame) -> None:
        """Run silo ``member``'s part of one round, starting from its ``hello`` frame.

        Raises
        ------
        FrameError, CryptoError
            If this silo sent a malformed message (its session ends; the round goes on without
            it if enough silos remain).
        SplitError
            If the round fails for every silo (too few silos left at a stage).
        """
        roster, timeout, step = self.engine.roster, self.engine.roster.timeout, hello.step
        offer = _offer(hello)
        driver: MaskingDriver[str] | None = roster.gather(
            "secagg.setup", member, offer, self._setup
        )
        if driver is None:
            _send(session, step, HELLO, meta={"alone": True})
            return
        with roster.cond:
            first = driver.messages().get(member)
        if first is None:
            _send(session, step, DROPPED, meta={"reason": "not in the round"})
            return
        _send(session, step, HELLO, first)
        for stage in STAGES:
            reply = _blob(_recv(session, stage, timeout))
            with roster.cond:
                driver.receive(member, reply)
            out = roster.gather(
                f"secagg.{stage}",
                member,
                None,
                lambda values: self._advance(driver, values),
                lambda: set(driver.active),
            )
            if isinstance(out, torch.Tensor):
                silos = len(driver.result().contributors)
                _send(session, step, RESULT, meta={"silos": silos}, tensors={"average": out})
                return
            if out is None:
                reason = driver.dropped.get(member, "left out of the round")
                _send(session, step, DROPPED, meta={"reason": reason[:500]})
                return
            _send(session, step, STAGES[STAGES.index(stage) + 1], out)

    def _advance(self, driver: MaskingDriver[str], values: dict[str, Any]) -> dict[str, Any]:
        """The last silo at a stage's rendezvous checks the replies and prepares the next stage."""
        try:
            driver.advance()
        except RoundFailed as exc:
            raise SplitError(str(exc)) from None
        if driver.done:
            result = driver.result()
            if result.dropped:
                log.warning(
                    "Secure averaging round %d: %s left out; averaged the other %d.",
                    driver.config.round_id,
                    ", ".join(sorted(result.dropped)),
                    len(result.contributors),
                )
            self.engine.after_sync({n: float(c) for n, c in result.examples.items()})
            average = torch.from_numpy(result.mean)
            return dict.fromkeys(values, average)
        messages = driver.messages()
        return {m: messages.get(m) for m in values}

    def _setup(self, offers: dict[str, dict[str, Any]]) -> dict[str, MaskingDriver[str] | None]:
        """First rendezvous: fix the roster and the round (or tell a lone silo to skip)."""
        names = sorted(offers)
        if len(names) < MIN_SILOS:
            return dict.fromkeys(names, None)
        for key in ("length", "clip"):
            values = {n: offers[n][key] for n in names}
            if len(set(values.values())) > 1:
                raise SplitError(
                    f"silos disagree on the adapter's {key} ({values}); every silo needs the same "
                    "model, adapter and split.secagg_clip"
                )
        if len(names) > MAX_SILOS:
            raise SplitError(f"secure averaging takes at most {MAX_SILOS} silos, got {len(names)}")
        self.rounds += 1
        try:
            driver: MaskingDriver[str] = MaskingDriver(
                self.job,
                self.rounds,
                names,
                offers[names[0]]["length"],
                offers[names[0]]["clip"],
                min_silos=MIN_SILOS,
                enrollment=self.enrollment,
            )
        except RoundFailed as exc:
            raise SplitError(str(exc)) from None
        log.info("Secure averaging round %d: %d silos.", self.rounds, len(names))
        return dict.fromkeys(names, driver)


def _offer(hello: Frame) -> dict[str, Any]:
    """A silo's validated ``hello``: vector length and clip."""
    if hello.meta.get("stage") != HELLO:
        raise FrameError(
            f"a secure-averaging round starts with stage '{HELLO}', got {hello.meta.get('stage')!r}"
        )
    length = _int(hello.meta, "length", MAX_VECTOR_LENGTH + 1)
    clip = hello.meta.get("clip")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip):
        raise FrameError(f"frame meta 'clip' must be a finite number, got {clip!r}")
    if length < 1 or clip <= 0:
        raise FrameError("a secure-averaging hello needs length >= 1 and clip > 0")
    return {"length": length, "clip": float(clip)}


def _int(meta: Mapping[str, Any], key: str, high: int) -> int:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < high:
        raise FrameError(f"frame meta '{key}' must be an int in [0, {high}), got {value!r}")
    return value
