"""Coordinator side of one round's upload over Flower: plain FedAvg, masking, or HE aggregation.

Each function sends the round's stage messages through a Flower ``Grid``. A silo that fails, does
not answer, or sends a reply with a missing or malformed field is dropped from the round with a
log line naming the silo and the field; the round goes on while ``federation.min_silos`` remain.
Nothing a single silo sends ends the job. Masking runs the one stage driver of
:mod:`silotune.secagg.masking_driver` (Flower is only its carrier); HE decryption goes through the
silos' :class:`~silotune.secagg.he_guard.DecryptionGuard`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from numpy.typing import NDArray

from silotune.config.federation import FederationConfig
from silotune.crypto import he
from silotune.crypto.exceptions import CryptoError
from silotune.crypto.identity import Enrollment
from silotune.errors import SilotuneError
from silotune.federated import silo
from silotune.federated.vectors import (
    FederationError,
    get_bytes,
    get_config,
    get_vector,
    records,
    to_array,
)
from silotune.secagg import he_guard
from silotune.secagg.masking_common import ADVERTISE
from silotune.secagg.masking_driver import MaskingDriver, RoundFailed, run_round

log = logging.getLogger(__name__)

MASK_ACTIONS = dict(zip(silo.MASK_STAGES, silo.MASK_ACTIONS, strict=True))


@dataclass
class RoundResult:
    """The aggregate of one round and what it cost."""

    mean_update: NDArray[np.float32]  # weighted mean over contributors, on the round's support
    contributors: list[int]  # node ids whose update is in the sum
    dropped: dict[int, str]  # node id -> why it dropped out
    loss: float  # example-weighted mean of the silos' local losses
    upload_bytes: float  # mean bytes of the update payload one silo uploaded
    update_norms: list[float] = field(default_factory=list)


@dataclass
class RoundInput:
    """What every silo of the round receives."""

    job: bytes  # random per job; bound into every signature
    round_no: int
    global_vec: NDArray[np.float32]
    support: NDArray[np.int64] | None
    enrollment: Enrollment | None = None  # lets the coordinator drop silos with bad signatures

    @property
    def length(self) -> int:
        return self.global_vec.size if self.support is None else self.support.size

    def arrays(self) -> dict[str, object]:
        out: dict[str, object] = {"global": to_array(self.global_vec)}
        if self.support is not None:
            out["support"] = to_array(self.support)
        return out


def exchange(
    grid: Grid,
    contents: dict[int, RecordDict],
    action: str,
    round_no: int,
    timeout: float,
) -> tuple[dict[int, RecordDict], dict[int, str]]:
    """Send one stage to each node; return (replies by node, failures by node)."""
    messages = [
        Message(body, dst_node_id=node, message_type=f"train.{action}", group_id=str(round_no))
        for node, body in contents.items()
    ]
    replies: dict[int, RecordDict] = {}
    failed: dict[int, str] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            failed[node] = str(reply.error.reason)
        elif node in contents:
            replies[node] = reply.content
    for node in contents:
        if node not in replies and node not in failed:
            failed[node] = f"no answer to stage {action} within {timeout:.0f} s"
    for node, why in failed.items():
        log.warning("round %d: silo node %d dropped at stage %s: %s", round_no, node, action, why)
    return replies, failed


def _drop(dropped: dict[int, str], node: int, round_no: int, why: str) -> None:
    dropped[node] = why
    log.warning("round %d: silo node %d dropped: %s", round_no, node, why)


def _need(survivors: Iterable[int], fed: FederationConfig, stage: str, round_no: int) -> None:
    count = len(list(survivors))
    if count < fed.min_silos:
        raise FederationError(
            f"round {round_no} failed: only {count} silo(s) completed stage {stage}; "
            f"federation.min_silos is {fed.min_silos}"
        )


def _summary(reply: RecordDict, fed: FederationConfig) -> tuple[int, float, float]:
    """(examples, loss, update norm) of a reply; FederationError names a missing or bad field."""
    conf = get_config(reply)
    out = []
    for key in ("examples", "loss", "update_norm"):
        value = conf.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FederationError(f"its reply lacks a numeric '{key}'")
        out.append(value)
    n = out[0]
    if not isinstance(n, int) or not 1 <= n <= fed.max_examples:
        raise FederationError(
            f"it claims {n} training examples; allowed 1..{fed.max_examples} "
            "(federation.max_examples)"
        )
    return n, float(out[1]), float(out[2])


def _weight_basis(fed: FederationConfig, examples: int) -> int:
    return 1 if fed.weighting == "equal" else examples


def plain_round(
    grid: Grid, nodes: list[int], fed: FederationConfig, inp: RoundInput
) -> RoundResult:
    """No secure aggregation: silos upload float32 updates; the coordinator weights them."""
    body = {
        n: records(inp.arrays(), round=inp.round_no, job=inp.job.hex())  # type: ignore[arg-type]
        for n in nodes
    }
    replies, dropped = exchange(grid, body, silo.PLAIN, inp.round_no, fed.round_timeout_s)
    total = np.zeros(inp.length, dtype=np.float64)
    weights, losses, norms, sizes, kept = 0, 0.0, [], [], []
    for node, reply in replies.items():
        try:
            n, loss, norm = _summary(reply, fed)
            values = get_vector(reply, "arrays", "update", np.float32, inp.length)
            if not np.isfinite(values).all():
                raise FederationError("its update holds NaN or infinite values")
        except FederationError as exc:
            _drop(dropped, node, inp.round_no, str(exc))
            continue
        w = _weight_basis(fed, n)
        total += w * values.astype(np.float64)
        weights += w
        losses += w * loss
        norms.append(norm)
        sizes.append(values.nbytes)
        kept.append(node)
    _need(kept, fed, "train", inp.round_no)
    mean = (total / weights).astype(np.float32)
    return RoundResult(mean, sorted(kept), dropped, losses / weights, float(np.mean(sizes)), norms)


def masking_round(
    grid: Grid, nodes: list[int], fed: FederationConfig, inp: RoundInput
) -> RoundResult:
    """Authenticated pairwise-mask SecAgg; the coordinator only sees masked vectors and the sum."""
    r = inp.round_no
    try:
        driver: MaskingDriver[int] = MaskingDriver(
            inp.job,
            r,
            nodes,
            inp.length,
            fed.secagg_clip,
            threshold=fed.masking_threshold,
            weighting=fed.weighting,
            max_examples=fed.max_examples,
            min_silos=fed.min_silos,
            enrollment=inp.enrollment,
        )
    except RoundFailed as exc:
        raise FederationError(f"{exc} (federation.masking_threshold, federation.silos)") from None
    losses: dict[int, tuple[float, float]] = {}

    def carry(stage: str, messages: dict[int, bytes]) -> tuple[dict[int, bytes], dict[int, str]]:
        body = {}
        for node, message in messages.items():
            arrays = {"msg": to_array(message)}
            if stage == ADVERTISE:  # silos train at the first stage
                arrays |= inp.arrays()  # type: ignore[arg-type]
            body[node] = records(arrays, round=r)  # type: ignore[arg-type]
        replies, failed = exchange(grid, body, MASK_ACTIONS[stage], r, fed.round_timeout_s)
        out = {}
        for node, reply in replies.items():
            try:
                out[node] = get_bytes(reply, "arrays", "msg")
                if stage == ADVERTISE:
                    conf = get_config(reply)
                    losses[node] = (float(conf["loss"]), float(conf["update_norm"]))  # type: ignore[arg-type]
            except (FederationError, KeyError, TypeError, ValueError) as exc:
                failed[node] = f"malformed reply: {exc}"
        return out, failed

    try:
        result = run_round(driver, carry)
    except RoundFailed as exc:
        raise FederationError(str(exc)) from None
    n_in = sum(result.examples.values())
    loss = sum(result.examples[n] * losses.get(n, (0.0, 0.0))[0] for n in result.contributors)
    norms = [losses[n][1] for n in result.contributors if n in losses]
    return RoundResult(
        result.mean, result.contributors, result.dropped, loss / n_in, result.upload_bytes, norms
    )


@dataclass
class HeSetup:
    """The coordinator's HE material: a public-only context, never a secret key."""

    public_context: bytes
    holders: list[int]  # nodes holding the secret key (leader first)
    examples: dict[int, int]
    names: dict[int, str] = field(default_factory=dict)  # node -> enrolled name (for signatures)


def _signed_key(reply: RecordDict) -> tuple[str, bytes, bytes]:
    """(identity name, transport key, signature) a silo sent; relayed as is to its peers."""
    sig = b""
    if "transport_sig" in reply.array_records.get("arrays", ArrayRecord()):
        sig = get_bytes(reply, "arrays", "transport_sig")
    name = str(get_config(reply).get("identity", ""))
    return name, get_bytes(reply, "arrays", "transport_pk"), sig


def _peer_records(body: RecordDict, peers: dict[int, tuple[str, bytes, bytes]]) -> RecordDict:
    """Attach peers' transport keys, signatures and names (keyed by peer id) to a message."""
    body["peers"] = ArrayRecord({str(p): to_array(pk) for p, (_, pk, _) in peers.items()})
    body["peer_sigs"] = ArrayRecord({str(p): to_array(sig) for p, (_, _, sig) in peers.items()})
    body["peer_names"] = ConfigRecord({str(p): name for p, (name, _, _) in peers.items()})
    return body


def he_setup(grid: Grid, nodes: list[int], fed: FederationConfig, job: bytes) -> HeSetup:
    """Key leader makes the keys; peers get the secret sealed to their signed X25519 keys via us."""
    timeout = fed.round_timeout_s
    hello = {n: records(job=job.hex()) for n in nodes}
    replies, dropped = exchange(grid, hello, silo.HELLO, 0, timeout)
    tpks, examples = {}, {}
    for node, reply in replies.items():
        try:
            tpks[node] = _signed_key(reply)
            n = get_config(reply).get("examples")
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= fed.max_examples:
                raise FederationError(f"it claims {n!r} examples; allowed 1..{fed.max_examples}")
            examples[node] = n
        except FederationError as exc:
            _drop(dropped, node, 0, str(exc))
    _need(tpks, fed, "hello", 0)
    leader = min(tpks)
    body = _peer_records(
        records(clip=fed.secagg_clip, job=job.hex()),
        {n: k for n, k in tpks.items() if n != leader},
    )
    answer, failed = exchange(grid, {leader: body}, silo.HE_KEYGEN, 0, timeout)
    if leader not in answer:
        raise FederationError(f"HE key setup failed: the key leader failed ({failed[leader]})")
    try:
        public = get_bytes(answer[leader], "arrays", "public")
        if he.HeKeys.load(public).is_private:
            raise FederationError("the key leader sent the coordinator a secret key")
        sealed = answer[leader].array_records["sealed"]
    except (FederationError, CryptoError, KeyError) as exc:
        raise FederationError(f"HE key setup refused: {exc}") from None
    installs: dict[int, RecordDict] = {}
    for node in tpks:
        if node != leader and str(node) in sealed:
            install = records({"sealed": to_array(sealed[str(node)].numpy())}, job=job.hex())
            installs[node] = _peer_records(install, {leader: tpks[leader]})
    installed, _ = exchange(grid, installs, silo.HE_INSTALL, 0, timeout)
    holders = [leader] + sorted(installed)
    _need(holders, fed, "HE key setup", 0)
    names = {n: tpks[n][0] for n in holders}
    return HeSetup(public, holders, {n: examples[n] for n in holders}, names)


def he_round(
    grid: Grid, nodes: list[int], fed: FederationConfig, inp: RoundInput, setup: HeSetup
) -> RoundResult:
    """Silos upload signed ciphertexts of ``w_i x_i``; key holders decrypt only a checked sum."""
    r, timeout = inp.round_no, fed.round_timeout_s
    basis = {n: _weight_basis(fed, setup.examples[n]) for n in nodes}
    total_basis = sum(basis.values())
    weights = {n: basis[n] / total_basis for n in nodes}
    body = {
        n: records(inp.arrays(), round=r, job=inp.job.hex(), weight=weights[n])  # type: ignore[arg-type]
        for n in nodes
    }
    replies, dropped = exchange(grid, body, silo.HE_TRAIN, r, timeout)
    items: dict[int, he_guard.Contribution] = {}
    losses, norms = {}, []
    for node, reply in replies.items():
        try:
            n, loss, norm = _summary(reply, fed)
            item = he_guard.Contribution(
                str(get_config(reply).get("identity", "")),
                get_bytes(reply, "arrays", "ciphertext"),
                n,
                weights[node],
                get_bytes(reply, "arrays", "signature"),
            )
            if inp.enrollment is not None:
                item.verify(inp.enrollment, inp.job, r)
            if he.ciphertext_terms(item.ciphertext) != 1:
                raise FederationError("its ciphertext declares several terms")
        except (FederationError, CryptoError, SilotuneError) as exc:
            _drop(dropped, node, r, str(exc))
            continue
        items[node], losses[node] = item, n * loss
        norms.append(norm)
    _need(items, fed, "train", r)
    total = _decrypt(grid, fed, inp, setup, items, dropped)
    n_in = sum(basis[n] for n in items)
    mean = (total.astype(np.float64) * (total_basis / n_in)).astype(np.float32)
    loss = sum(losses.values()) / sum(i.examples for i in items.values())
    size = float(np.mean([len(i.ciphertext) for i in items.values()]))
    return RoundResult(mean, sorted(items), dropped, loss, size, norms)


def _decrypt(
    grid: Grid,
    fed: FederationConfig,
    inp: RoundInput,
    setup: HeSetup,
    items: dict[int, he_guard.Contribution],
    dropped: dict[int, str],
) -> NDArray[np.float32]:
    """Ask ``he_decrypters`` key holders to decrypt the signed contributions; compare the sums."""
    r = inp.round_no
    request = he_guard.pack_contributions(inp.job, r, [items[n] for n in sorted(items)])
    candidates = [n for n in setup.holders if n in items] + [
        n for n in setup.holders if n not in items
    ]
    sums: dict[int, NDArray[np.float32]] = {}
    why = "no key holder is left"
    for node in candidates:
        if len(sums) == fed.he_decrypters:
            break
        dec = records({"request": to_array(request)}, round=r, length=inp.length)
        answer, failed = exchange(grid, {node: dec}, silo.HE_DECRYPT, r, fed.round_timeout_s)
        if node not in answer:
            why = failed.get(node, "no answer")
            continue
        try:
            values = get_vector(answer[node], "arrays", "sum", np.float32, inp.length)
            if inp.enrollment is not None:
                he_guard.verify_sum(
                    inp.enrollment,
                    setup.names.get(node, ""),
                    get_bytes(answer[node], "arrays", "signature"),
                    inp.job,
                    r,
                    values,
                    sorted(i.name for i in items.values()),
                )
            bound = len(items) * fed.secagg_clip * (1 + 1e-6)
            if not np.isfinite(values).all() or float(np.abs(values).max(initial=0)) > bound:
                raise FederationError("its decrypted sum is not finite or exceeds n x clip")
        except (FederationError, CryptoError, SilotuneError) as exc:
            why = f"silo node {node} returned a bad sum: {exc}"
            _drop(dropped, node, r, why)
            continue
        sums[node] = values
    if not sums:
        raise FederationError(f"round {r} failed: no silo could decrypt the aggregate ({why})")
    if len(sums) < fed.he_decrypters:
        log.warning(
            "round %d: only %d key holder(s) decrypted; a lying decrypter would go unnoticed",
            r,
            len(sums),
        )
    first, *others = sums.items()
    for node, values in others:
        if not np.array_equal(values, first[1]):
            raise FederationError(
                f"round {r} failed: key holders {first[0]} and {node} decrypted the same signed "
                "ciphertexts to different sums; one of them lies"
            )
    return first[1]
