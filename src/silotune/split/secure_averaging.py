"""Secure averaging of silo adapters in split mode: pairwise-mask SecAgg over the split sessions.

The protocol objects are those of federated ``masking`` (:class:`~silotune.crypto.masking.
MaskingClient` on each silo, :class:`~silotune.crypto.masking.MaskingServer` on the coordinator);
only the carrier differs: every SecAgg message travels in a ``secagg`` frame on the silo's
authenticated, encrypted session with the coordinator. One round, five request/answer stages:

================  ===========================================  ===================================
silo sends        what                                         coordinator answers
================  ===========================================  ===================================
``hello``         vector length, clip, fresh X25519 transport  ``alone`` (one live silo: keep your
                  key (examples: from its ``join``)            adapter) or the SecAgg config, the
                                                               silo's id, peers' transport keys
``public_key``    its mask public key                          the key broadcast
``share_bundles`` Shamir share bundles, each sealed end to     the bundles sealed for this silo,
                  end for one peer (the coordinator routes)    and its weight ``n_i / N``
``masked_vector`` ``encode(w_i x_i) + masks`` mod 2**32        the unmask request
``reveal``        the requested shares                         the weighted average (float32)
================  ===========================================  ===================================

The coordinator only routes, adds masked uint32 vectors and removes the masks with the shares the
protocol reveals: it learns the weighted average and nothing else about a silo's adapter.

Dropouts: a round's roster is the silos live when it starts; with one live silo it is skipped (the
average of one adapter is that adapter, nothing is sent). Inside a round the Shamir threshold is a
majority of the roster: a silo lost before uploading is left out (its pairwise masks are rebuilt
from its key shares), a silo lost after uploading stays in the average (its self mask is rebuilt).
If fewer than the threshold remain at a stage, the round fails with :class:`SplitError`.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray

from silotune.crypto import box as sealing
from silotune.crypto.exceptions import CryptoError
from silotune.crypto.masking import MaskingClient, MaskingServer, SecAggConfig
from silotune.crypto.masking_wire import MAX_SILOS, MAX_VECTOR_LENGTH
from silotune.split.frames import KIND_SECAGG, Frame, FrameError
from silotune.split.session import FrameSession, SplitError

if TYPE_CHECKING:
    from silotune.split.engines import TrunkEngine
    from silotune.split.silo import TrunkLink

__all__ = [
    "STAGES",
    "MaskedAveraging",
    "MaskingAverager",
    "flatten_state",
    "pack_bundles",
    "unflatten_state",
    "unpack_bundles",
]

log = logging.getLogger(__name__)

HELLO, PUBLIC_KEY, SHARE_BUNDLES = "hello", "public_key", "share_bundles"
MASKED_VECTOR, REVEAL = "masked_vector", "reveal"
STAGES = (HELLO, PUBLIC_KEY, SHARE_BUNDLES, MASKED_VECTOR, REVEAL)

PURPOSE_BUNDLE = b"split-secagg-share-bundle"  # binds sealed bundles to this use (and the round)
_BUNDLE_ENTRY = struct.Struct(">QI")  # peer id, sealed length


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


def pack_bundles(bundles: Mapping[int, bytes]) -> bytes:
    """``{peer id: sealed bundle}`` as ``count u16 | (peer u64, length u32, bytes)*``."""
    body = [struct.pack(">H", len(bundles))]
    for peer in sorted(bundles):
        body.append(_BUNDLE_ENTRY.pack(peer, len(bundles[peer])) + bundles[peer])
    return b"".join(body)


def unpack_bundles(data: bytes) -> dict[int, bytes]:
    """Inverse of :func:`pack_bundles`; raises FrameError on truncation, repeats or extra bytes."""
    if len(data) < 2:
        raise FrameError("a bundle list is truncated")
    (count,) = struct.unpack_from(">H", data, 0)
    out: dict[int, bytes] = {}
    offset = 2
    for _ in range(count):
        if offset + _BUNDLE_ENTRY.size > len(data):
            raise FrameError("a bundle list is truncated")
        peer, length = _BUNDLE_ENTRY.unpack_from(data, offset)
        offset += _BUNDLE_ENTRY.size
        if peer in out or offset + length > len(data):
            raise FrameError("a bundle list repeats a peer or is truncated")
        out[peer] = bytes(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise FrameError("a bundle list has trailing bytes")
    return out


def _blob_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Carry bytes in a frame: an int32 tensor of the bytes zero-padded to a multiple of 4."""
    padded = data + b"\0" * (-len(data) % 4)
    return {"blob": torch.from_numpy(np.frombuffer(padded, dtype="<i4").copy())}


def _blob(frame: Frame) -> bytes:
    """The bytes a ``secagg`` frame carries (see :func:`_blob_tensors`)."""
    tensor, size = frame.tensors.get("blob"), frame.meta.get("nbytes")
    if (
        tensor is None
        or tensor.dtype != torch.int32
        or tensor.dim() != 1
        or isinstance(size, bool)
        or not isinstance(size, int)
        or not 0 <= 4 * tensor.numel() - size < 4
    ):
        raise FrameError(f"a '{KIND_SECAGG}' frame must carry an int32 'blob' and its 'nbytes'")
    return tensor.numpy().astype("<i4").tobytes()[:size]


def _send(
    session: FrameSession,
    step: int,
    stage: str,
    data: bytes | None = None,
    meta: Mapping[str, Any] | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> None:
    out = dict(tensors or {})
    info = {"stage": stage, **(meta or {})}
    if data is not None:
        out.update(_blob_tensors(data))
        info["nbytes"] = len(data)
    session.send(KIND_SECAGG, step, out, info)


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
    """:class:`~silotune.split.averaging.AdapterAverager` through pairwise-mask secure aggregation.

    Parameters
    ----------
    link
        The silo's session with the coordinator.
    clip
        ``split.secagg_clip``: bound on each pre-weighted value (the same at every silo).
    """

    def __init__(self, link: TrunkLink, clip: float) -> None:
        self.link = link
        self.clip = float(clip)

    def average(
        self, step: int, state: Mapping[str, torch.Tensor], examples: int
    ) -> dict[str, torch.Tensor]:
        """Return the example-weighted average of every live silo's ``state``.

        ``examples`` is the count this silo announced at ``join``; the coordinator weighs by that.

        Raises
        ------
        SplitError
            If the round fails (too few silos left, a protocol check fails, or a pre-weighted
            value exceeds ``split.secagg_clip``).
        """
        del examples  # the coordinator weighs by the count of the join frame
        if not any(t.numel() for t in state.values()):
            raise SplitError(
                "this silo has no adapter values to average; secure averaging needs at least one "
                "(or set split.secure_averaging: none)"
            )
        try:
            return self._round(step, state)
        except (CryptoError, SplitError, ValueError) as exc:
            # Tell the coordinator at once, so the round goes on (or fails) without this silo.
            self.link.session.send_error(str(exc))
            if isinstance(exc, (FrameError, SplitError)):
                raise
            raise SplitError(f"secure averaging at step {step} failed: {exc}") from None

    def _round(self, step: int, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        session, timeout, wire_step = self.link.session, self.link.timeout, self.link.step
        vector = flatten_state(state)  # (L,)
        transport = sealing.new_transport_key()  # fresh per round, like the mask keys
        hello = {
            "length": int(vector.size),
            "clip": self.clip,
            "transport_pk": sealing.public_bytes(transport).hex(),
        }
        _send(session, wire_step, HELLO, meta=hello)
        reply = _recv(session, HELLO, timeout)
        if reply.meta.get("alone") is True:
            log.info("Step %d: the only live silo; its adapter is the average.", step)
            return {name: tensor.detach().clone() for name, tensor in state.items()}
        config_bytes = _blob(reply)
        config = SecAggConfig.from_bytes(config_bytes)
        client = MaskingClient(_int(reply.meta, "secagg_id", 1 << 63))
        if config.vector_length != vector.size or config.clip != self.clip:
            raise SplitError(
                f"the coordinator's round config has {config.vector_length} values and clip "
                f"{config.clip}; this silo has {vector.size} values and split.secagg_clip "
                f"{self.clip}"
            )
        peers = _peer_keys(reply.meta, config, client.silo_id)
        pk_msg = client.setup(config_bytes)

        _send(session, wire_step, PUBLIC_KEY, pk_msg)
        bundles = client.share_keys(_blob(_recv(session, PUBLIC_KEY, timeout)))
        r = config.round_id
        sealed = {
            p: sealing.seal(transport, peers[p], PURPOSE_BUNDLE, r, b) for p, b in bundles.items()
        }

        _send(session, wire_step, SHARE_BUNDLES, pack_bundles(sealed))
        reply = _recv(session, SHARE_BUNDLES, timeout)
        weight = reply.meta.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1:
            raise FrameError(f"the averaging weight must be a number in (0, 1], got {weight!r}")
        opened = {}
        for sender, blob in unpack_bundles(_blob(reply)).items():
            if sender not in peers:
                raise FrameError(f"a share bundle came from silo {sender}, which is not a peer")
            what = f"the share bundle from silo {sender}"
            opened[sender] = sealing.open_sealed(
                transport, peers[sender], PURPOSE_BUNDLE, r, blob, what
            )
        weighted = vector * float(weight)
        peak = float(np.abs(weighted).max()) if weighted.size else 0.0
        if not math.isfinite(peak) or peak > config.clip:
            raise SplitError(
                f"an adapter value times its averaging weight is {peak:.4g}, outside "
                f"split.secagg_clip {config.clip}; raise split.secagg_clip (the same on every silo)"
            )

        _send(session, wire_step, MASKED_VECTOR, client.masked_update(opened, weighted))
        reveal = client.unmask(_blob(_recv(session, MASKED_VECTOR, timeout)))

        _send(session, wire_step, REVEAL, reveal)
        reply = _recv(session, REVEAL, timeout)
        average = reply.tensors.get("average")
        if average is None or average.dtype != torch.float32 or average.dim() != 1:
            raise FrameError("the averaged adapter must be a float32 vector 'average'")
        if not bool(torch.isfinite(average).all()):
            raise FrameError("the averaged adapter holds NaN or infinite values")
        log.debug("Step %d: securely averaged over %s silos.", step, reply.meta.get("silos"))
        return unflatten_state(average.numpy(), state)


def _int(meta: Mapping[str, Any], key: str, high: int) -> int:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < high:
        raise FrameError(f"frame meta '{key}' must be an int in [0, {high}), got {value!r}")
    return value


def _peer_keys(meta: Mapping[str, Any], config: SecAggConfig, own: int) -> dict[int, bytes]:
    """The peers' transport keys from the setup answer: one 32-byte key per other silo."""
    raw = meta.get("peers")
    if not isinstance(raw, dict):
        raise FrameError("the setup answer must map each peer's id to its transport key")
    try:
        peers = {int(k): bytes.fromhex(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise FrameError("the setup answer's transport keys must be hex strings") from None
    if set(peers) != set(config.silo_ids) - {own} or any(len(k) != 32 for k in peers.values()):
        raise FrameError("the setup answer must carry one 32-byte transport key per peer")
    return peers


# --------------------------------------------------------------------------- coordinator


@dataclass
class _Round:
    """The coordinator's state of one secure-averaging round."""

    server: MaskingServer
    ids: dict[str, int]  # silo name -> SecAgg id (1..k, by sorted name)
    examples: dict[str, int]  # silo name -> training examples (its join count)
    transport: dict[str, str]  # silo name -> its round transport public key (hex)
    shared: list[str] = field(default_factory=list)  # sent share bundles (U2)
    uploaded: list[str] = field(default_factory=list)  # sent a masked vector (U3)

    @property
    def config(self) -> SecAggConfig:
        return self.server.config

    def members(self) -> set[str]:
        return set(self.ids)


class MaskedAveraging:
    """The coordinator's side of secure averaging: routes stages, sums, never sees an adapter.

    One per :class:`~silotune.split.trunk.TrunkService`; each silo's session thread calls
    :meth:`serve` when its ``hello`` arrives. Stages meet at the engine's roster (one rendezvous
    per stage), so a silo that leaves mid-round is handled by the SecAgg dropout recovery.

    Parameters
    ----------
    engine
        The trunk engine: its roster (live silos, examples, rendezvous) and its ``after_sync``.
    """

    def __init__(self, engine: TrunkEngine) -> None:
        self.engine = engine
        self.rounds = 0  # SecAgg round ids (bound into every message and mask stream)

    def serve(self, session: FrameSession, member: str, hello: Frame) -> None:
        """Run silo ``member``'s part of one round, starting from its ``hello`` frame.

        Raises
        ------
        FrameError, CryptoError
            If this silo sent a malformed or invalid message (its session ends; the round goes
            on without it if enough silos remain).
        SplitError
            If the round fails for every silo (too few silos left at a stage).
        """
        roster, timeout, step = self.engine.roster, self.engine.roster.timeout, hello.step
        offer = _offer(hello)
        rnd: _Round | None = roster.gather("secagg.setup", member, offer, self._setup)
        if rnd is None:
            _send(session, step, HELLO, meta={"alone": True})
            return
        own = rnd.ids[member]
        peers = {str(rnd.ids[n]): pk for n, pk in rnd.transport.items() if n != member}
        _send(session, step, HELLO, rnd.config.to_bytes(), {"secagg_id": own, "peers": peers})

        pk_msg = _blob(_recv(session, PUBLIC_KEY, timeout))
        with roster.cond:
            rnd.server.receive_public_key(pk_msg)
        broadcast = self._stage(member, rnd, "secagg.keys", lambda _: rnd.server.key_broadcast())
        _send(session, step, PUBLIC_KEY, broadcast)

        bundles = unpack_bundles(_blob(_recv(session, SHARE_BUNDLES, timeout)))
        with roster.cond:
            rnd.server.receive_bundles(own, bundles)
            rnd.shared.append(member)
        routed, weight = roster.gather(
            "secagg.share", member, None, lambda v: self._route(rnd, v), rnd.members
        )
        _send(session, step, SHARE_BUNDLES, routed, {"weight": weight})

        upload = _blob(_recv(session, MASKED_VECTOR, timeout))
        with roster.cond:
            rnd.server.receive_masked(upload)
            rnd.uploaded.append(member)
        request = self._stage(member, rnd, "secagg.masked", lambda _: rnd.server.unmask_request())
        _send(session, step, MASKED_VECTOR, request)

        reveal = _blob(_recv(session, REVEAL, timeout))
        with roster.cond:
            rnd.server.receive_reveal(reveal)
        average = self._stage(member, rnd, "secagg.reveal", lambda _: self._finish(rnd))
        _send(
            session, step, REVEAL, meta={"silos": len(rnd.uploaded)}, tensors={"average": average}
        )

    def _stage(
        self, member: str, rnd: _Round, point: str, make: Callable[[dict[str, Any]], Any]
    ) -> Any:
        """Meet the round's other silos at ``point``; the last one computes ``make`` for all."""

        def combine(values: dict[str, Any]) -> dict[str, Any]:
            try:
                result = make(values)
            except CryptoError as exc:
                raise SplitError(
                    f"secure averaging round {rnd.config.round_id} stopped: {exc} (the threshold "
                    f"is a majority of the round's {len(rnd.ids)} silos)"
                ) from None
            return dict.fromkeys(values, result)

        return self.engine.roster.gather(point, member, None, combine, rnd.members)

    def _setup(self, offers: dict[str, dict[str, Any]]) -> dict[str, _Round | None]:
        """First rendezvous: fix the roster, ids and config (or tell a lone silo to skip)."""
        names = sorted(offers)
        if len(names) < 2:
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
        ids = {n: i + 1 for i, n in enumerate(names)}
        config = SecAggConfig(
            self.rounds,
            tuple(ids.values()),
            len(names) // 2 + 1,
            offers[names[0]]["length"],
            offers[names[0]]["clip"],
        )
        examples = {n: self.engine.roster.examples[n] for n in names}
        transport = {n: offers[n]["transport_pk"] for n in names}
        rnd = _Round(MaskingServer(config), ids, examples, transport)
        log.info("Secure averaging round %d: %d silos.", self.rounds, len(names))
        return dict.fromkeys(names, rnd)

    def _route(self, rnd: _Round, values: dict[str, Any]) -> dict[str, tuple[bytes, float]]:
        """Route every contributor its sealed bundles, with its weight over the silos in ``U2``."""
        total = sum(rnd.examples[n] for n in rnd.shared)
        out = {}
        for name in values:
            try:
                routed = rnd.server.bundles_for(rnd.ids[name])
            except CryptoError as exc:
                raise SplitError(
                    f"secure averaging round {rnd.config.round_id} stopped: {exc}"
                ) from None
            out[name] = (pack_bundles(routed), rnd.examples[name] / total)
        return out

    def _finish(self, rnd: _Round) -> torch.Tensor:
        """Unmask the sum of ``w_i x_i`` over the uploaders and rescale it to their average."""
        total = rnd.server.aggregate()  # sum over U3 of (n_i / N_U2) * x_i, float32 (L,)
        n_shared = sum(rnd.examples[n] for n in rnd.shared)
        n_in = sum(rnd.examples[n] for n in rnd.uploaded)
        average = (total.astype(np.float64) * (n_shared / n_in)).astype(np.float32)
        dropped = sorted(set(rnd.ids) - set(rnd.uploaded))
        if dropped:
            log.warning(
                "Secure averaging round %d: %s left before uploading; averaged the other %d.",
                rnd.config.round_id,
                ", ".join(dropped),
                len(rnd.uploaded),
            )
        self.engine.after_sync({n: float(rnd.examples[n]) for n in rnd.uploaded})
        return torch.from_numpy(average)


def _offer(hello: Frame) -> dict[str, Any]:
    """A silo's validated ``hello``: vector length, clip and transport public key."""
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
    pk = hello.meta.get("transport_pk")
    if not isinstance(pk, str) or len(pk) != 64:
        raise FrameError("frame meta 'transport_pk' must be 64 hex characters")
    try:
        bytes.fromhex(pk)
    except ValueError:
        raise FrameError("frame meta 'transport_pk' must be 64 hex characters") from None
    return {"length": length, "clip": float(clip), "transport_pk": pk}
