"""The silo (Flower ClientApp): local steps on private data, then the round's upload stage.

Every stage is a message type ``train.<action>``. A silo keeps what must survive between the
stages of a round (its X25519 transport key, the HE secret context, its masking state, the update
it is about to upload, its error-feedback residual) in its own Flower node state, which never
leaves the silo's SuperNode; each stage may run in a fresh worker process.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from numpy.typing import NDArray

from silotune.config import JobConfig, load_config
from silotune.crypto import ckks, masking
from silotune.data.partition import partition_dirichlet, partition_iid
from silotune.errors import ConfigError
from silotune.crypto import box as sealing
from silotune.federated import dp
from silotune.federated.pinning import SiloTrust
from silotune.federated.sparsify import sparsify
from silotune.federated.vectors import (
    FederationError,
    flatten,
    get_bytes,
    get_config,
    get_vector,
    load_flat,
    records,
    to_array,
    trainable,
)
from silotune.train.loop import BatchStream, forward_loss, make_optimizer, train_step
from silotune.train.trainer import Job, build_job

log = logging.getLogger(__name__)

# Message actions (the message type is "train.<action>").
PLAIN = "plain"
HELLO = "hello"
HE_KEYGEN, HE_INSTALL, HE_TRAIN, HE_DECRYPT = "he_keygen", "he_install", "he_train", "he_decrypt"
MASK_SETUP, MASK_SHARE = "mask_setup", "mask_share"
MASK_COLLECT, MASK_UNMASK = "mask_collect", "mask_unmask"
ACTIONS = (PLAIN, HELLO, HE_KEYGEN, HE_INSTALL, HE_TRAIN, HE_DECRYPT) + (
    MASK_SETUP,
    MASK_SHARE,
    MASK_COLLECT,
    MASK_UNMASK,
)

PURPOSE_BUNDLE = b"secagg-share-bundle"
PURPOSE_HE_SECRET = b"he-secret-context"

_STATE = "silotune"  # ConfigRecord in the node state: keys, masking state
_PENDING = "silotune.pending"  # ArrayRecord: the update waiting for the masking collect stage
_RESIDUAL = "silotune.residual"  # ArrayRecord: error-feedback residual


# ------------------------------------------------------------------------------ local training


@dataclass
class LocalResult:
    """What one silo's local round produced (before any encoding)."""

    values: NDArray[np.float32]  # update on the round's support (or dense)
    examples: int
    loss: float
    update_norm: float  # L2 norm of the raw update, before clipping/noise


_JOBS: dict[str, Job] = {}
_STREAMS: dict[tuple[str, int], BatchStream] = {}


def _job(cfg: JobConfig) -> tuple[str, Job]:
    """Model, task and data of this config, built once per worker process (a cache only)."""
    key = cfg.model_dump_json()
    if key not in _JOBS:
        _JOBS.clear()
        _STREAMS.clear()
        _JOBS[key] = build_job(cfg)
    return key, _JOBS[key]


def local_job(cfg: JobConfig) -> Job:
    """The model, task and data the silos of this config train on (built once per process)."""
    return _job(cfg)[1]


def silo_indices(cfg: JobConfig, job: Job, partition: int) -> list[int]:
    """Indices of the training examples silo `partition` holds (seeded, same in every process)."""
    fed = cfg.federation
    n = len(job.splits.train)
    if fed.partition == "iid":
        return partition_iid(n, fed.silos, cfg.train.seed)[partition]
    if cfg.data.task != "classification":
        raise ConfigError("federation.partition dirichlet needs data.task classification")
    labels = [ex["label"] for ex in job.splits.train]
    return partition_dirichlet(labels, fed.silos, fed.alpha, cfg.train.seed)[partition]


def _stream(cfg: JobConfig, partition: int) -> tuple[Job, BatchStream]:
    key, job = _job(cfg)
    if (key, partition) not in _STREAMS:
        if not 0 <= partition < cfg.federation.silos:
            raise ConfigError(
                f"partition-id {partition} is outside 0..{cfg.federation.silos - 1} "
                "(federation.silos)"
            )
        examples = [job.stream.examples[i] for i in silo_indices(cfg, job, partition)]
        _STREAMS[(key, partition)] = BatchStream(
            examples, cfg.train.batch_size, cfg.train.seed + 7919 * partition, job.stream.pad_id
        )
    return job, _STREAMS[(key, partition)]


def _prox_loss(anchors: Sequence[torch.Tensor], mu: float) -> Callable[..., torch.Tensor]:
    """FedProx: task loss + (mu / 2) * ||w - w_global||^2 over the adapter parameters."""

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        prox = sum(((p - a) ** 2).sum() for p, a in zip(trainable(model), anchors, strict=True))
        return forward_loss(model, batch) + 0.5 * mu * prox

    return loss_fn


def local_round(
    cfg: JobConfig,
    partition: int,
    global_vec: NDArray[np.float32],
    round_no: int,
    support: NDArray[np.int64] | None,
    residual: NDArray[np.float32] | None,
) -> tuple[LocalResult, NDArray[np.float32] | None]:
    """Train `local_steps` from the global adapter; return the (DP, sparsified) update.

    Batches are those of steps ``(round_no - 1) * local_steps + k`` of this silo's stream, so a
    restarted job replays exactly the same data. The update is local minus global.
    """
    job, stream = _stream(cfg, partition)
    fed = cfg.federation
    load_flat(job.model, global_vec)
    optimizer = make_optimizer(job.model, cfg.train)  # fresh local AdamW every round
    loss_fn = forward_loss
    if fed.strategy == "fedprox" and fed.proximal_mu > 0:
        loss_fn = _prox_loss([p.detach().clone() for p in trainable(job.model)], fed.proximal_mu)
    losses = []
    for k in range(fed.local_steps):
        step = (round_no - 1) * fed.local_steps + k
        out = train_step(job.model, stream, step, optimizer, None, cfg.train, job.device, loss_fn)
        losses.append(out.loss)
    update = flatten(job.model) - global_vec  # (L,)
    norm = float(np.linalg.norm(update.astype(np.float64)))
    if fed.dp.enabled:
        update, _ = dp.privatize(update, fed.dp.clip_norm, fed.dp.noise_multiplier)
    values, new_residual = sparsify(update, support, residual)
    result = LocalResult(values, len(stream.examples), float(np.mean(losses)), norm)
    return result, new_residual


# ------------------------------------------------------------------------------ node state


def _state(context: Context) -> ConfigRecord:
    if _STATE not in context.state.config_records:
        context.state[_STATE] = ConfigRecord()
    return context.state.config_records[_STATE]


def transport_key(context: Context) -> X25519PrivateKey:
    """This silo's X25519 transport key for the job, created on first use."""
    state = _state(context)
    if "transport_sk" not in state:
        state["transport_sk"] = sealing.new_transport_key().private_bytes_raw()
    return X25519PrivateKey.from_private_bytes(bytes(state["transport_sk"]))  # type: ignore[arg-type]


def _he_keys(context: Context) -> ckks.CkksKeys:
    state = _state(context)
    if "he_secret" not in state:
        raise FederationError("this silo holds no HE key; the key setup did not reach it")
    return ckks.CkksKeys.load(bytes(state["he_secret"]))  # type: ignore[arg-type]


def _residual(context: Context, cfg: JobConfig, length: int) -> NDArray[np.float32] | None:
    if not (cfg.federation.pruning.enabled and cfg.federation.pruning.error_feedback):
        return None
    if _RESIDUAL in context.state.array_records:
        res = context.state.array_records[_RESIDUAL]["r"].numpy()
        if res.shape == (length,):
            return res.astype(np.float32)
    return np.zeros(length, dtype=np.float32)


def _partition(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            "this SuperNode has no integer node-config 'partition-id' (start it with "
            '--node-config "partition-id=0")'
        ) from None


# ------------------------------------------------------------------------------ stages


def _train_from(message: Message, context: Context, cfg: JobConfig) -> tuple[LocalResult, int]:
    """Run the local round a message asks for; keeps the new residual in the node state."""
    conf = get_config(message.content)
    round_no = int(conf["round"])  # type: ignore[arg-type]
    global_vec = get_vector(message.content, "arrays", "global", np.float32).astype(np.float32)
    support = None
    if "support" in message.content.array_records.get("arrays", ArrayRecord()):
        support = get_vector(message.content, "arrays", "support", np.int64).astype(np.int64)
        if (
            support.size == 0
            or support[0] < 0
            or support[-1] >= global_vec.size
            or (support.size > 1 and not (np.diff(support) > 0).all())
        ):
            raise FederationError("the round's support is not a sorted set of valid indices")
    residual = _residual(context, cfg, global_vec.size)
    result, new_residual = local_round(
        cfg, _partition(context), global_vec, round_no, support, residual
    )
    if new_residual is not None:
        context.state[_RESIDUAL] = ArrayRecord({"r": to_array(new_residual)})
    return result, round_no


def _summary(result: LocalResult) -> dict[str, Any]:
    return {"examples": result.examples, "loss": result.loss, "update_norm": result.update_norm}


def _signed_key(context: Context, trust: SiloTrust) -> tuple[dict[str, Any], str]:
    """This silo's transport public key and its identity signature, as reply arrays + name."""
    tpk = sealing.public_bytes(transport_key(context))
    name, sig = trust.sign(tpk)
    return {"transport_pk": to_array(tpk), "transport_sig": to_array(sig)}, name


def peer_table(content: RecordDict, what: str, trust: SiloTrust) -> dict[int, bytes]:
    """Peers' transport keys relayed by the coordinator, checked against the enrollment."""
    pks = content.array_records.get("peers", ArrayRecord())
    sigs = content.array_records.get("peer_sigs", ArrayRecord())
    names = content.config_records.get("peer_names", ConfigRecord())
    table = {}
    for key in pks:
        sig = sigs[key].numpy().tobytes() if key in sigs else b""
        table[int(key)] = (str(names.get(key, "")), pks[key].numpy().tobytes(), sig)
    trust.verify(table, what)
    return {peer: pk for peer, (_, pk, _) in table.items()}


def handle(
    cfg: JobConfig, action: str, message: Message, context: Context, trust: SiloTrust
) -> RecordDict:
    """Answer one stage message (validated before any work)."""
    content = message.content
    if action == PLAIN:
        result, _ = _train_from(message, context, cfg)
        return records({"update": to_array(result.values)}, **_summary(result))
    if action == HELLO:
        _, stream = _stream(cfg, _partition(context))
        arrays, name = _signed_key(context, trust)
        return records(arrays, examples=len(stream.examples), identity=name)
    if action == HE_KEYGEN:
        return _he_keygen(content, context, trust)
    if action == HE_INSTALL:
        return _he_install(content, context, trust)
    if action == HE_TRAIN:
        weight = float(get_config(content)["weight"])  # type: ignore[arg-type]
        result, _ = _train_from(message, context, cfg)
        blob = ckks.encrypt_update(_he_keys(context), result.values, weight)
        return records({"ciphertext": to_array(blob)}, **_summary(result))
    if action == HE_DECRYPT:
        length = int(get_config(content)["length"])  # type: ignore[arg-type]
        total = ckks.decrypt_aggregate(
            _he_keys(context), get_bytes(content, "arrays", "aggregate"), length
        )
        return records({"sum": to_array(total)})
    if action in (MASK_SETUP, MASK_SHARE, MASK_COLLECT, MASK_UNMASK):
        return _masking(cfg, action, message, context, trust)
    raise ValueError(f"Unknown stage: {action!r}; expected one of {ACTIONS}.")


def _he_keygen(content: RecordDict, context: Context, trust: SiloTrust) -> RecordDict:
    """Key leader: make the HE keys, keep the secret, seal it to each peer, return the public part."""
    keys = ckks.CkksKeys.generate(ckks.CkksParams(clip=float(get_config(content)["clip"])))  # type: ignore[arg-type]
    secret = keys.serialize_secret()
    _state(context)["he_secret"] = secret
    own = transport_key(context)
    peers = peer_table(content, "HE key setup", trust)
    sealed = {
        str(node): to_array(sealing.seal(own, pk, PURPOSE_HE_SECRET, 0, secret))
        for node, pk in peers.items()
    }
    body = records({"public": to_array(keys.serialize_public())})
    body["sealed"] = ArrayRecord(sealed)
    return body


def _he_install(content: RecordDict, context: Context, trust: SiloTrust) -> RecordDict:
    """Peer: open the sealed secret context from the key leader and keep it."""
    leader = peer_table(content, "HE key install", trust)
    if len(leader) != 1:
        raise FederationError("the HE key install message must name exactly one key leader")
    secret = sealing.open_sealed(
        transport_key(context),
        next(iter(leader.values())),
        PURPOSE_HE_SECRET,
        0,
        get_bytes(content, "arrays", "sealed"),
        "the HE secret context from the key leader",
    )
    keys = ckks.CkksKeys.load(secret)
    if not keys.is_private:
        raise FederationError("the key leader sent a public-only HE context")
    _state(context)["he_secret"] = secret
    return records(installed=True)


def _masking(
    cfg: JobConfig, action: str, message: Message, context: Context, trust: SiloTrust
) -> RecordDict:
    """The four SecAgg stages; share bundles travel sealed end to end between silos."""
    content, state = message.content, _state(context)
    conf = get_config(content)
    round_no = int(conf["round"])  # type: ignore[arg-type]
    if action == MASK_SETUP:
        result, _ = _train_from(message, context, cfg)
        context.state[_PENDING] = ArrayRecord({"values": to_array(result.values)})
        client = masking.MaskingClient(int(conf["secagg_id"]))  # type: ignore[arg-type]
        pk_msg = client.setup(get_bytes(content, "arrays", "secagg_config"))
        state["masking"] = client.export_state()
        arrays, name = _signed_key(context, trust)
        return records({"pk_msg": to_array(pk_msg), **arrays}, identity=name, **_summary(result))
    client = masking.MaskingClient.restore_state(bytes(state["masking"]))  # type: ignore[arg-type]
    own = transport_key(context)
    if action == MASK_SHARE:
        peer_pks = peer_table(content, f"round {round_no} key sharing", trust)
        bundles = client.share_keys(get_bytes(content, "arrays", "broadcast"))
        missing = set(bundles) - set(peer_pks)
        if missing:
            raise FederationError(
                f"the coordinator sent no transport key for silos {sorted(missing)}"
            )
        sealed = {
            str(peer): to_array(sealing.seal(own, peer_pks[peer], PURPOSE_BUNDLE, round_no, b))
            for peer, b in bundles.items()
        }
        state["peer_pks"] = json.dumps({str(k): v.hex() for k, v in peer_pks.items()})
        state["masking"] = client.export_state()
        body = records()
        body["bundles"] = ArrayRecord(sealed)
        return body
    if action == MASK_COLLECT:
        peer_pks = {int(k): bytes.fromhex(v) for k, v in json.loads(str(state["peer_pks"])).items()}
        routed = content.array_records.get("bundles", ArrayRecord())
        opened = {}
        for name in routed:
            sender = int(name)
            if sender not in peer_pks:
                raise FederationError(f"share bundle from silo {sender}, which shared no key")
            opened[sender] = sealing.open_sealed(
                own,
                peer_pks[sender],
                PURPOSE_BUNDLE,
                round_no,
                routed[name].numpy().tobytes(),
                f"the share bundle from silo {sender}",
            )
        values = context.state.array_records[_PENDING]["values"].numpy()
        weight = float(conf["weight"])  # type: ignore[arg-type]
        upload = client.masked_update(
            opened, (values.astype(np.float64) * weight).astype(np.float32)
        )
        del context.state[_PENDING]
        state["masking"] = client.export_state()
        return records({"masked": to_array(upload)})
    reveal = client.unmask(get_bytes(content, "arrays", "request"))
    state["masking"] = client.export_state()
    return records({"reveal": to_array(reveal)})


_CONFIGS: dict[tuple[str, float], JobConfig] = {}


def node_job_config(context: Context) -> JobConfig:
    """The silo's own job config: node-config ``config`` (a YAML path), else run-config ``config``."""
    raw = context.node_config.get("config") or context.run_config.get("config")
    if not raw:
        raise ConfigError(
            "this SuperNode has no job config: start it with --node-config "
            "\"partition-id=0 config='/path/job.yaml'\""
        )
    path = Path(str(raw)).expanduser()
    key = (str(path), path.stat().st_mtime if path.exists() else 0.0)
    if key not in _CONFIGS:
        _CONFIGS[key] = load_config(path)
    return _CONFIGS[key]


_TRUST: dict[tuple[str | None, str | None], SiloTrust] = {}


def _trust_from_config(cfg: JobConfig) -> SiloTrust:
    key = (cfg.federation.identity_key, cfg.federation.enrollment)
    if key not in _TRUST:
        _TRUST[key] = SiloTrust.from_files(*key)
    return _TRUST[key]


def make_client_app(
    cfg: JobConfig | None,
    mods: list[Any] | None = None,
    trust: dict[int, SiloTrust] | None = None,
) -> ClientApp:
    """The ClientApp; every stage is registered as ``train.<action>``.

    With `cfg` None each silo reads its own job config from its node config (deployment).
    `trust` maps partition ids to identities (simulation); otherwise each silo loads
    `federation.identity_key` and `federation.enrollment` from its config, if set.
    """
    app = ClientApp(mods=mods or [])
    for action in ACTIONS:

        def stage(message: Message, context: Context, action: str = action) -> Message:
            job_cfg = cfg if cfg is not None else node_job_config(context)
            mine = trust[_partition(context)] if trust is not None else _trust_from_config(job_cfg)
            return Message(handle(job_cfg, action, message, context, mine), reply_to=message)

        app.train(action)(stage)
    return app
