"""Coordinator side of one round's upload: plain FedAvg, pairwise masking, or HE aggregation.

Each function sends the round's stage messages through a Flower ``Grid``, treats a silo that
fails or does not answer as dropped, and returns the weighted mean update over the silos whose
update entered the sum. The coordinator never holds an individual update in the clear with
``masking`` or ``ckks``, and never holds the HE secret key (``HeSetup.public_context`` is checked
to be public-only when it arrives).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from numpy.typing import NDArray

from silotune.crypto import ckks, masking
from silotune.crypto.exceptions import CryptoError
from silotune.federated import silo
from silotune.federated.config import FederationConfig
from silotune.federated.vectors import (
    FederationError,
    get_bytes,
    get_config,
    get_vector,
    records,
    to_array,
)

log = logging.getLogger(__name__)


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

    round_no: int
    global_vec: NDArray[np.float32]
    support: NDArray[np.int64] | None

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


def _need(survivors: Iterable[int], fed: FederationConfig, stage: str, round_no: int) -> None:
    count = len(list(survivors))
    if count < fed.min_silos:
        raise FederationError(
            f"round {round_no} failed: only {count} silo(s) completed stage {stage}; "
            f"federation.min_silos is {fed.min_silos}"
        )


def _examples(reply: RecordDict) -> tuple[int, float, float]:
    conf = get_config(reply)
    n = int(conf["examples"])  # type: ignore[arg-type]
    if n <= 0:
        raise FederationError(f"a silo reported {n} training examples")
    return n, float(conf["loss"]), float(conf["update_norm"])  # type: ignore[arg-type]


def plain_round(
    grid: Grid, nodes: list[int], fed: FederationConfig, inp: RoundInput
) -> RoundResult:
    """No secure aggregation: silos upload float32 updates; the coordinator weights by examples."""
    body = {n: records(inp.arrays(), round=inp.round_no) for n in nodes}  # type: ignore[arg-type]
    replies, failed = exchange(grid, body, silo.PLAIN, inp.round_no, fed.round_timeout_s)
    _need(replies, fed, "train", inp.round_no)
    total = np.zeros(inp.length, dtype=np.float64)
    weights, losses, norms, sizes = 0, 0.0, [], []
    for reply in replies.values():
        n, loss, norm = _examples(reply)
        values = get_vector(reply, "arrays", "update", np.float32, inp.length)
        total += n * values.astype(np.float64)
        weights += n
        losses += n * loss
        norms.append(norm)
        sizes.append(values.nbytes)
    mean = (total / weights).astype(np.float32)
    return RoundResult(
        mean, sorted(replies), failed, losses / weights, float(np.mean(sizes)), norms
    )


def masking_round(
    grid: Grid, nodes: list[int], fed: FederationConfig, inp: RoundInput
) -> RoundResult:
    """Pairwise-mask SecAgg: the coordinator only ever sees masked uint32 vectors and their sum."""
    r, timeout = inp.round_no, fed.round_timeout_s
    sid = {node: i + 1 for i, node in enumerate(sorted(nodes))}  # SecAgg ids 1..k
    k = len(nodes)
    threshold = fed.masking_threshold or k // 2 + 1
    try:
        config = masking.SecAggConfig(
            r, tuple(sid.values()), threshold, inp.length, fed.secagg_clip
        )
    except ValueError as exc:
        raise FederationError(
            f"federation.masking_threshold {threshold} does not fit a round of {k} silos "
            f"(allowed {k // 2 + 1}..{k}): {exc}"
        ) from None
    server = masking.MaskingServer(config)
    dropped: dict[int, str] = {}

    # 1. setup: every silo trains, then answers with its mask public key and transport key.
    body = {}
    for node in nodes:
        arrays = inp.arrays() | {"secagg_config": to_array(config.to_bytes())}
        body[node] = records(arrays, round=r, secagg_id=sid[node])  # type: ignore[arg-type]
    replies, failed = exchange(grid, body, silo.MASK_SETUP, r, timeout)
    dropped |= failed
    examples, losses, norms, tpks = {}, {}, [], {}
    for node, reply in replies.items():
        try:
            server.receive_public_key(get_bytes(reply, "arrays", "pk_msg"))
        except CryptoError as exc:
            dropped[node] = f"bad public key message: {exc}"
            continue
        examples[node], losses[node], norm = _examples(reply)
        norms.append(norm)
        tpks[sid[node]] = _signed_key(reply)
    _need(examples, fed, "setup", r)
    broadcast = server.key_broadcast()

    # 2. share keys: bundles come back sealed for their recipients; the coordinator only routes.
    body = {}
    for node in examples:
        body[node] = _peer_records(records({"broadcast": to_array(broadcast)}, round=r), tpks)
    replies, failed = exchange(grid, body, silo.MASK_SHARE, r, timeout)
    dropped |= failed
    for node, reply in replies.items():
        bundles = reply.array_records.get("bundles", ArrayRecord())
        try:
            server.receive_bundles(
                sid[node], {int(p): bundles[p].numpy().tobytes() for p in bundles}
            )
        except (CryptoError, ValueError) as exc:
            dropped[node] = f"bad share bundles: {exc}"
    shared = [n for n in replies if n not in dropped]
    _need(shared, fed, "share_keys", r)

    # 3. collect: pre-weight by n_i / N over the silos that shared keys; upload masked vectors.
    n_shared = sum(examples[n] for n in shared)
    body = {}
    for node in shared:
        try:
            routed = server.bundles_for(sid[node])
        except CryptoError as exc:
            raise FederationError(f"round {r} failed: {exc}") from None
        body[node] = records(round=r, weight=examples[node] / n_shared)
        body[node]["bundles"] = ArrayRecord({str(s): to_array(b) for s, b in routed.items()})
    replies, failed = exchange(grid, body, silo.MASK_COLLECT, r, timeout)
    dropped |= failed
    sizes = []
    for node, reply in replies.items():
        upload = get_bytes(reply, "arrays", "masked")
        try:
            server.receive_masked(upload)
        except CryptoError as exc:
            dropped[node] = f"bad masked upload: {exc}"
            continue
        sizes.append(len(upload))
    uploaded = [n for n in replies if n not in dropped]
    _need(uploaded, fed, "collect_masked_vectors", r)

    # 4. unmask: survivors reveal shares; a silo lost now is still in the sum (its seed is rebuilt).
    try:
        request = server.unmask_request()
    except CryptoError as exc:
        raise FederationError(f"round {r} failed: {exc}") from None
    body = {n: records({"request": to_array(request)}, round=r) for n in uploaded}
    replies, failed = exchange(grid, body, silo.MASK_UNMASK, r, timeout)
    for node, reply in replies.items():
        try:
            server.receive_reveal(get_bytes(reply, "arrays", "reveal"))
        except CryptoError as exc:
            failed[node] = f"bad reveal: {exc}"
    try:
        total = server.aggregate()  # sum over uploaded of (n_i / n_shared) * x_i
    except CryptoError as exc:
        raise FederationError(
            f"round {r} failed: {exc} (federation.masking_threshold {threshold})"
        ) from None
    for node, why in failed.items():
        log.warning(
            "round %d: silo node %d missed unmasking (%s); its update still counts", r, node, why
        )
    n_in = sum(examples[n] for n in uploaded)
    mean = (total.astype(np.float64) * (n_shared / n_in)).astype(np.float32)
    loss = sum(examples[n] * losses[n] for n in uploaded) / n_in
    return RoundResult(mean, sorted(uploaded), dropped, loss, float(np.mean(sizes)), norms)


@dataclass
class HeSetup:
    """The coordinator's HE material: a public-only context, never a secret key."""

    public_context: bytes
    holders: list[int]  # nodes holding the secret key (leader first)
    examples: dict[int, int]


def he_setup(grid: Grid, nodes: list[int], fed: FederationConfig) -> HeSetup:
    """Key leader makes the keys; peers get the secret sealed to their X25519 keys via us."""
    timeout = fed.round_timeout_s
    replies, _ = exchange(grid, {n: records() for n in nodes}, silo.HELLO, 0, timeout)
    _need(replies, fed, "hello", 0)
    tpks = {n: _signed_key(r) for n, r in replies.items()}
    leader = min(tpks)
    body = _peer_records(
        records(clip=fed.secagg_clip), {n: k for n, k in tpks.items() if n != leader}
    )
    answer, failed = exchange(grid, {leader: body}, silo.HE_KEYGEN, 0, timeout)
    if leader not in answer:
        raise FederationError(f"HE key setup failed: the key leader failed ({failed[leader]})")
    public = get_bytes(answer[leader], "arrays", "public")
    if ckks.CkksKeys.load(public).is_private:
        raise FederationError(
            "HE key setup refused: the key leader sent the coordinator a secret key"
        )
    sealed = answer[leader].array_records["sealed"]
    installs: dict[int, RecordDict] = {}
    for node in tpks:
        if node != leader and str(node) in sealed:
            install = records({"sealed": to_array(sealed[str(node)].numpy())})
            installs[node] = _peer_records(install, {leader: tpks[leader]})
    installed, _ = exchange(grid, installs, silo.HE_INSTALL, 0, timeout)
    holders = [leader] + sorted(installed)
    _need(holders, fed, "HE key setup", 0)
    hello_examples = {n: int(get_config(r)["examples"]) for n, r in replies.items()}  # type: ignore[arg-type]
    return HeSetup(public, holders, hello_examples)


def he_round(
    grid: Grid, nodes: list[int], fed: FederationConfig, inp: RoundInput, setup: HeSetup
) -> RoundResult:
    """HE aggregation: silos upload ciphertexts of ``(n_i / N) * x_i``; the coordinator adds them."""
    r, timeout = inp.round_no, fed.round_timeout_s
    n_all = sum(setup.examples[n] for n in nodes)
    body = {
        n: records(inp.arrays(), round=r, weight=setup.examples[n] / n_all)  # type: ignore[arg-type]
        for n in nodes
    }
    replies, dropped = exchange(grid, body, silo.HE_TRAIN, r, timeout)
    _need(replies, fed, "train", r)
    cts, losses, norms, n_in = [], 0.0, [], 0
    for reply in replies.values():
        n, loss, norm = _examples(reply)
        cts.append(get_bytes(reply, "arrays", "ciphertext"))
        losses += n * loss
        norms.append(norm)
        n_in += n
    try:
        aggregate = ckks.aggregate(setup.public_context, cts)
    except (CryptoError, ValueError) as exc:
        raise FederationError(f"round {r} failed: a ciphertext was rejected: {exc}") from None
    # One surviving key holder decrypts the sum (never a single ciphertext) and returns it.
    total, why = None, ""
    for node in sorted(replies):
        dec = records({"aggregate": to_array(aggregate)}, round=r, length=inp.length)
        answer, failed = exchange(grid, {node: dec}, silo.HE_DECRYPT, r, timeout)
        if node in answer:
            total = get_vector(answer[node], "arrays", "sum", np.float32, inp.length)
            break
        why = failed[node]
    if total is None:
        raise FederationError(f"round {r} failed: no silo could decrypt the aggregate ({why})")
    mean = (total.astype(np.float64) * (n_all / n_in)).astype(np.float32)
    size = float(np.mean([len(c) for c in cts]))
    return RoundResult(mean, sorted(replies), dropped, losses / n_in, size, norms)
