"""The coordinator's trunk service: one authenticated session per silo, frames in, trunk calls out.

Per connection (one thread each): the handshake (only enrolled silos get past it), a ``join`` frame,
then a loop over the silo's frames until ``bye``:

=========  ====================================  =========================================
frame in   tensors / meta                        answer
=========  ====================================  =========================================
join       meta ``examples``, ``averaging``,     join: meta ``settings``, ``digest`` (this
           ``settings``, ``digest``              job's); then waits for ``split.silos`` silos
forward    ``hidden (B,T,C)``, ``mask (B,T)``;   forward ``hidden (B,T,C)``
           meta ``train`` (false = validation)
backward   ``grad (B,T,C)``; meta ``last``       backward ``grad (B,T,C)``; meta ``trunk_sq``
commit     meta ``coef`` (clipping factor)       (none)
sync       the silo's adapter; meta ``examples`` sync: the average over live silos
secagg     one secure-averaging stage; meta      secagg: that stage's answer (see
           ``stage``                             :mod:`~.secure_averaging`)
bye        (none)                                bye: the trunk adapter (and its SPF rows)
=========  ====================================  =========================================

A frame that fails authentication, replays, arrives out of order or breaks the limits ends that
silo's session with a clear log line and an ``error`` frame; the other silos' sessions go on, and
the half-done step of the silo that left never reaches the trunk adapter.

A silo that dies while the others wait for it leaves the roster (its connection is found
closed), so they go on without it. An enrolled silo may join again after a crash: once its new
session has passed the handshake and agreed on the settings, it replaces the old one, whose
connection is closed and which can no longer act for the silo (see :mod:`~.roster`).

A silo whose shared settings (:mod:`~.agreement`: model, adapter, cut, task, wire dtype,
averaging, sync cadence) differ from the coordinator's is refused at join, before its first step,
with one line naming each differing key and both values; the silo compares the answer too.

Every silo of a job averages its adapter the same way, ``none`` (``sync``: in clear to the
coordinator) or ``masking`` (``secagg``: the coordinator learns only the average), as its ``join``
says; a silo asking for the other way than the job's is refused, and so is a frame of the other way.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from silotune.crypto.exceptions import CryptoError
from silotune.crypto.identity import Enrollment, IdentityKey
from silotune.models.segments import MAX_SEGMENT
from silotune.split.agreement import (
    differences,
    mismatch_message,
    read_settings,
    settings_digest,
)
from silotune.split.engines import TrunkEngine
from silotune.split.secure_averaging import MaskedAveraging
from silotune.split.session import FrameSession, SplitError, accept_session
from silotune.transport.base import Connection, ConnectionClosed, TransportError
from silotune.transport.frames import (
    KIND_BACKWARD,
    KIND_BYE,
    KIND_COMMIT,
    KIND_FORWARD,
    KIND_JOIN,
    KIND_SECAGG,
    KIND_SYNC,
    Frame,
    FrameError,
)

__all__ = ["SessionRecord", "Trunk", "TrunkService", "check_activation"]

if TYPE_CHECKING:
    from silotune.config import JobConfig
    from silotune.split.resume import TrunkCheckpoints

log = logging.getLogger(__name__)
TRUNK_ADAPTER = "trunk_adapter.safetensors"

MAX_ROWS = 4096  # most sequences one forward frame may carry
AVERAGING = ("none", "masking")  # split.secure_averaging


def check_activation(frame: Frame, hidden_size: int, max_tokens: int) -> tuple[torch.Tensor, ...]:
    """Return ``(hidden (B,T,C), mask (B,T))`` of a forward frame, or raise FrameError.

    ``mask`` is 0/1 padding in training, a segment mask (:mod:`silotune.models.segments`) in
    evaluation.
    """
    if set(frame.tensors) != {"hidden", "mask"}:
        raise FrameError(
            f"a forward frame must carry exactly 'hidden' and 'mask', got {sorted(frame.tensors)}"
        )
    hidden, mask = frame.tensors["hidden"], frame.tensors["mask"]
    if hidden.dim() != 3 or hidden.shape[-1] != hidden_size or not hidden.is_floating_point():
        raise FrameError(
            f"hidden has shape {tuple(hidden.shape)} and dtype {hidden.dtype}; it must be "
            f"float (B, T, {hidden_size})"
        )
    rows, tokens = hidden.shape[:2]
    if not 0 < rows <= MAX_ROWS or not 0 < tokens <= max_tokens:
        raise FrameError(
            f"hidden has {rows} rows of {tokens} tokens; allowed 1..{MAX_ROWS} rows of "
            f"1..{max_tokens} tokens"
        )
    if mask.dtype != torch.int64 or tuple(mask.shape) != (rows, tokens):
        raise FrameError(
            f"mask must be int64 ({rows}, {tokens}), got {mask.dtype} {tuple(mask.shape)}"
        )
    # Evaluation frames may pack several label continuations after one prompt (segment ids
    # 2.. of silotune.models.segments); training frames carry a plain 0/1 padding mask.
    top = 1 if frame.meta.get("train", True) else MAX_SEGMENT
    if not bool(((mask >= 0) & (mask <= top)).all()) or not bool((mask == 1).any(dim=1).all()):
        raise FrameError(
            f"mask must hold only 0..{top} (1 for the prompt), with at least one 1 per row"
        )
    if not bool(torch.isfinite(hidden).all()):
        raise FrameError("hidden holds NaN or infinite values")
    return hidden, mask


def _check_grad(frame: Frame, hidden_size: int) -> torch.Tensor:
    if set(frame.tensors) != {"grad"}:
        raise FrameError(f"a backward frame must carry exactly 'grad', got {sorted(frame.tensors)}")
    grad = frame.tensors["grad"]
    if grad.dim() != 3 or grad.shape[-1] != hidden_size or not grad.is_floating_point():
        raise FrameError(
            f"grad has shape {tuple(grad.shape)}; it must be float (B, T, {hidden_size})"
        )
    if not bool(torch.isfinite(grad).all()):
        raise FrameError("grad holds NaN or infinite values")
    return grad


def _number(meta: dict[str, Any], key: str, low: float, high: float) -> float:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FrameError(f"frame meta '{key}' must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise FrameError(f"frame meta '{key}' must be in [{low}, {high}], got {value}")
    return float(value)


class Trunk(Protocol):
    """What the coordinator runs the trunk as: in this process, or inside an enclave.

    :class:`TrunkService` and :class:`~silotune.split.enclave_trunk.EnclaveTrunk` both serve
    silos' connections, keep a record per session, and save the trunk adapter their own way.
    """

    records: list[SessionRecord]
    finished: threading.Event

    def handle(self, connection: Connection) -> None:
        """Serve one silo's connection to its end."""
        ...

    @property
    def commits(self) -> int:
        """Optimizer steps the trunk took."""
        ...

    def check(self) -> None:
        """Raise SplitError if the trunk failed (an enclave that died, say)."""
        ...

    def save(self, out: Path, cfg: JobConfig) -> dict[str, Any]:
        """Write the trunk adapter under ``out``; return what the run summary says of it."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the run summary says of where the trunk ran (empty: in this process)."""
        ...

    def close(self) -> None:
        """Release what the trunk holds (processes, threads)."""
        ...


@dataclass
class SessionRecord:
    """What happened to one silo's session (for logs, tests and the run summary)."""

    silo: str
    peer: str
    outcome: str = "open"  # open, finished, refused, rejected, vanished, replaced, failed
    detail: str = ""
    steps: int = 0


@dataclass
class TrunkService:
    """Serves the trunk to silos; pass :meth:`handle` to a transport server as its handler.

    Parameters
    ----------
    engine
        The trunk in the configured server mode.
    identity
        The coordinator's Ed25519 identity key (pinned by the silos).
    enrollment
        The silos allowed in.
    hidden_size, max_tokens
        Bounds for received activations.
    expected_silos
        Silos to wait for before the first step (``split.silos``).
    settings
        This job's :func:`~silotune.split.agreement.shared_settings`; a silo must join with the
        same.
    activation_dtype
        Wire dtype of the trunk's outputs and input gradients.
    averaging
        How silo adapters are averaged (``split.secure_averaging``: ``none`` or ``masking``);
        ``None`` lets the first silo that joins fix it for the job.
    checkpoints
        Writes the trunk's checkpoints at the silos' sync steps (``None``: none written).
    spf_rows
        The rows of the trunk's SPF deltas (:func:`~silotune.split.spf_parts.spf_rows_state`),
        sent with the trunk adapter at ``bye`` so a silo can save the complete SPF file.
    """

    engine: TrunkEngine
    identity: IdentityKey
    enrollment: Enrollment
    hidden_size: int
    max_tokens: int
    expected_silos: int
    settings: dict[str, Any]
    activation_dtype: str | None = None
    averaging: str | None = None
    checkpoints: TrunkCheckpoints | None = None
    spf_rows: dict[str, torch.Tensor] = field(default_factory=dict)
    records: list[SessionRecord] = field(default_factory=list)
    finished: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.averaging not in (None, *AVERAGING):
            raise ValueError(
                f"averaging must be None or one of {AVERAGING}, got {self.averaging!r}"
            )
        self.secure = MaskedAveraging(self.engine, self.enrollment)
        self.digest = settings_digest(self.settings)

    @property
    def timeout(self) -> float:
        return self.engine.roster.timeout

    @property
    def commits(self) -> int:
        return self.engine.commits

    def check(self) -> None:
        """Nothing can fail out of sight in this process."""

    def save(self, out: Path, cfg: JobConfig) -> dict[str, Any]:
        """Write ``trunk_adapter.safetensors`` (the coordinator's own adapter, in clear)."""
        from safetensors.torch import save_file

        save_file(self.engine.trunk_state(), out / TRUNK_ADAPTER, metadata={"format": "pt"})
        return {"trunk_adapter": str(out / TRUNK_ADAPTER)}

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """The service holds nothing beyond its sessions' threads."""

    def handle(self, connection: Connection) -> None:
        """Run one silo's session to its end; never raises for what the silo did."""
        record = SessionRecord(silo="?", peer=connection.peer)
        self.records.append(record)
        try:
            session = accept_session(connection, self.identity, self.enrollment, self.timeout)
        except SplitError as exc:
            record.outcome, record.detail = "refused", str(exc)
            log.warning("%s", exc)
            return
        record.silo = session.peer_name
        joined = False
        try:
            first = session.recv(self.timeout)
            if first.kind != KIND_JOIN:
                raise FrameError(f"the first frame must be 'join', got '{first.kind}'")
            examples = int(_number(first.meta, "examples", 1, 2**40))
            if not self._agree_settings(session, record, first):
                return
            self._agree_averaging(record.silo, first.meta.get("averaging", "none"))
            # Authenticated and agreed: only now may this session replace an older one.
            replaced = self.engine.roster.join(record.silo, examples, connection)
            joined = True
            if replaced is not None:
                self.engine.drop(record.silo)  # the old session's half-done step goes
            self.engine.add(record.silo)
            log.info("Silo %s joined (%d examples).", record.silo, examples)
            self.engine.roster.wait_for_quorum(self.expected_silos)
            self._serve(session, record)
        except (CryptoError, FrameError) as exc:
            record.outcome = "rejected"
            record.detail = f"rejected a frame from silo {record.silo!r}: {exc}"
            log.error("%s; ending its session (the other silos go on).", record.detail)
            session.send_error(record.detail)
        except (ConnectionClosed, TransportError) as exc:
            replaced = joined and self._replaced(record.silo)
            record.outcome = "replaced" if replaced else "vanished"
            record.detail = f"silo {record.silo!r} {record.outcome}: {exc}"
            log.warning("%s; the other silos go on.", record.detail)
        except SplitError as exc:
            roster = self.engine.roster
            if joined and not roster.holds(record.silo):  # died waiting, or joined again
                record.outcome = "replaced" if self._replaced(record.silo) else "vanished"
                record.detail = str(exc)
                log.warning("%s; the other silos go on.", exc)
            else:
                record.outcome, record.detail = "failed", str(exc)
                log.error("Session of silo %s failed: %s", record.silo, exc)
            session.send_error(str(exc))
        finally:
            roster = self.engine.roster
            # A replaced session leaves its silo's new seat and trunk state alone.
            if joined and roster.holds(record.silo):
                self.engine.drop(record.silo)
                roster.leave(record.silo)
            elif joined and record.silo not in roster.seats:  # removed while it waited
                self.engine.drop(record.silo)
            self._maybe_finished()

    def _replaced(self, silo: str) -> bool:
        """Whether a newer session of ``silo`` holds its seat (called from the old session)."""
        roster = self.engine.roster
        return silo in roster.seats and not roster.holds(silo)

    def _agree_settings(self, session: FrameSession, record: SessionRecord, join: Frame) -> bool:
        """Answer a join with this job's settings; refuse (False) a silo whose settings differ."""
        theirs = read_settings(join.meta, "join")
        answer = {"settings": self.settings, "digest": self.digest}
        if not differences(theirs, self.settings):
            session.send(KIND_JOIN, 0, meta=answer)
            return True
        record.outcome = "refused"
        record.detail = (
            f"refused silo {record.silo!r} at join: its settings differ from this job's: "
            f"{mismatch_message(theirs, self.settings)}"
        )
        log.error("%s", record.detail)
        session.send(KIND_JOIN, 0, meta=answer)  # the silo compares and names the keys itself
        session.send_error(record.detail)  # for a silo that does not compare the answer
        return False

    def _agree_averaging(self, silo: str, averaging: Any) -> None:
        """Fix the job's averaging with the first silo; refuse a silo that asks for the other."""
        if averaging not in AVERAGING:
            raise FrameError(f"join meta 'averaging' must be one of {AVERAGING}, got {averaging!r}")
        with self.engine.roster.cond:
            if self.averaging is None:
                self.averaging = averaging
        if averaging != self.averaging:
            raise SplitError(
                f"silo {silo!r} averages adapters with split.secure_averaging {averaging!r} but "
                f"this job uses {self.averaging!r}; set the same value on every silo"
            )

    def _maybe_finished(self) -> None:
        roster = self.engine.roster
        if roster.joined >= self.expected_silos and not roster.live:
            self.finished.set()

    def _serve(self, session: FrameSession, record: SessionRecord) -> None:
        name, engine = record.silo, self.engine
        wire = self.activation_dtype
        while True:
            frame = session.recv(self.timeout)
            if not engine.roster.holds(name):
                raise SplitError(f"this session of silo {name!r} was replaced by a newer one")
            if frame.kind == KIND_FORWARD:
                hidden, mask = check_activation(frame, self.hidden_size, self.max_tokens)
                if frame.meta.get("train", True):
                    out = engine.forward(name, hidden, mask)
                else:
                    out = engine.evaluate(name, hidden, mask)
                session.send(KIND_FORWARD, frame.step, {"hidden": out}, activation_dtype=wire)
            elif frame.kind == KIND_BACKWARD:
                grad = _check_grad(frame, self.hidden_size)
                grad_in, sq = engine.backward(name, grad, bool(frame.meta.get("last", False)))
                meta = {"trunk_sq": sq}
                session.send(
                    KIND_BACKWARD, frame.step, {"grad": grad_in}, meta, activation_dtype=wire
                )
            elif frame.kind == KIND_COMMIT:
                engine.commit(name, _number(frame.meta, "coef", 0.0, 1.0))
                record.steps += 1
                if self.checkpoints is not None:
                    self.checkpoints.committed(name, frame.step + 1)
            elif frame.kind in (KIND_SYNC, KIND_SECAGG) and self.averaging != (
                "none" if frame.kind == KIND_SYNC else "masking"
            ):
                raise FrameError(
                    f"a '{frame.kind}' frame, but this job averages with {self.averaging!r}"
                )
            elif frame.kind == KIND_SECAGG:
                self.secure.serve(session, name, frame)
            elif frame.kind == KIND_SYNC:
                examples = int(_number(frame.meta, "examples", 1, 2**40))
                state = session.recv_state(frame, self.timeout)
                averaged = engine.sync(name, state, examples)
                session.send_state(KIND_SYNC, frame.step, averaged)
            elif frame.kind == KIND_BYE:
                final = {**engine.finish(name), **self.spf_rows}
                session.send_state(KIND_BYE, frame.step, final)
                record.outcome = "finished"
                log.info("Silo %s finished after %d steps.", name, record.steps)
                return
            else:
                raise FrameError(f"unexpected frame kind '{frame.kind}' during training")
