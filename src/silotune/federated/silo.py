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
from silotune.crypto import box as sealing
from silotune.crypto import he
from silotune.data.partition import partition_dirichlet, partition_groups, partition_iid
from silotune.errors import ConfigError
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
from silotune.secagg.he_guard import Contribution, DecryptionGuard
from silotune.secagg.masking_common import STAGES
from silotune.secagg.masking_silo import MaskingSilo
from silotune.secagg.policy import SiloPolicy
from silotune.train.job import Job, build_job
from silotune.train.loop import BatchStream, forward_loss, make_optimizer, train_step
from silotune.train.threads import apply_threads, cores, threads_per_process

log = logging.getLogger(__name__)

# Message actions (the message type is "train.<action>").
PLAIN = "plain"
HELLO = "hello"
HE_KEYGEN, HE_INSTALL, HE_TRAIN, HE_DECRYPT = "he_keygen", "he_install", "he_train", "he_decrypt"
MASK_SETUP, MASK_SHARE = "mask_setup", "mask_share"
MASK_COLLECT, MASK_CHECK, MASK_UNMASK = "mask_collect", "mask_check", "mask_unmask"
MASK_ACTIONS = (MASK_SETUP, MASK_SHARE, MASK_COLLECT, MASK_CHECK, MASK_UNMASK)
MASK_STAGES = STAGES  # secagg stage carried by each masking action, in order
ACTIONS = (PLAIN, HELLO, HE_KEYGEN, HE_INSTALL, HE_TRAIN, HE_DECRYPT) + MASK_ACTIONS

PURPOSE_HE_SECRET = b"he-secret-context"

_STATE = "silotune"  # ConfigRecord in the node state: keys, masking state
_PENDING = "silotune.pending"  # ArrayRecord: the update waiting for the masking collect stage
_RESIDUAL = "silotune.residual"  # ArrayRecord: error-feedback residual
_OPTIMIZER = "silotune.optimizer"  # ArrayRecord: the silo's AdamW moments and step


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


def use_local_job(cfg: JobConfig, job: Job) -> None:
    """Train this process's silos of ``cfg`` on ``job`` instead of building one.

    The adapter enclave (:mod:`silotune.adapter_tee.fed_app`) builds its own job, whose frozen
    linear layers its host computes on masked tensors, and runs the silo stages on it.
    """
    key = cfg.model_dump_json()
    if key not in _JOBS:
        _STREAMS.clear()  # batch streams of the same config hold the same examples: kept
    _JOBS.clear()
    _JOBS[key] = job


def local_job(cfg: JobConfig) -> Job:
    """The model, task and data the silos of this config train on (built once per process)."""
    return _job(cfg)[1]


def silo_indices(cfg: JobConfig, job: Job, partition: int) -> list[int]:
    """Indices of the training examples silo `partition` holds (seeded, same in every process)."""
    fed = cfg.federation
    n = len(job.splits.train)
    if fed.partition == "iid":
        return partition_iid(n, fed.silos, cfg.train.seed)[partition]
    if cfg.data.task == "lm":
        raise ConfigError(
            f"federation.partition {fed.partition} needs labels (task classification) or "
            "domains (task instruction); data.task lm has neither"
        )
    key = "domain" if cfg.data.task == "instruction" else "label"
    labels = [str(ex.get(key, "")) for ex in job.splits.train]
    if fed.partition == "domain":
        return partition_groups(labels, fed.silos)[partition]
    return partition_dirichlet(labels, fed.silos, fed.alpha, cfg.train.seed)[partition]


def _stream(cfg: JobConfig, partition: int) -> tuple[Job, BatchStream]:
    key, job = _job(cfg)
    if (key, partition) not in _STREAMS:
        if cfg.federation.simulation and not 0 <= partition < cfg.federation.silos:
            raise ConfigError(
                f"partition-id {partition} is outside 0..{cfg.federation.silos - 1} "
                "(federation.silos)"
            )
        if cfg.federation.simulation:
            examples = [job.stream.examples[i] for i in silo_indices(cfg, job, partition)]
        else:  # deployment: this silo's data is all of its own training split
            examples = list(job.stream.examples)
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


def optimizer_moments(optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]):
    """AdamW's state over ``params`` as flat arrays: first and second moments ``(L,)``, step."""
    m, v, step = [], [], 0.0
    for p in params:
        state = optimizer.state.get(p, {})
        if not state:  # a parameter that never had a gradient
            m.append(torch.zeros(p.numel()))
            v.append(torch.zeros(p.numel()))
            continue
        m.append(state["exp_avg"].detach().float().reshape(-1).cpu())
        v.append(state["exp_avg_sq"].detach().float().reshape(-1).cpu())
        step = max(step, float(state["step"]))
    return torch.cat(m).numpy(), torch.cat(v).numpy(), step


def restore_moments(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    moments: tuple[NDArray[np.float32], NDArray[np.float32], float],
) -> None:
    """Put back what :func:`optimizer_moments` took (same parameters, same order)."""
    m, v, step = moments
    total = sum(p.numel() for p in params)
    if m.shape != (total,) or v.shape != (total,):
        raise FederationError(
            f"the kept optimizer state holds {m.shape[0]} values; the adapter has {total}"
        )
    offset = 0
    for p in params:
        n = p.numel()
        optimizer.state[p] = {
            "step": torch.tensor(step, dtype=torch.float32),
            "exp_avg": torch.from_numpy(m[offset : offset + n].copy()).view_as(p).to(p),
            "exp_avg_sq": torch.from_numpy(v[offset : offset + n].copy()).view_as(p).to(p),
        }
        offset += n


def local_round(
    cfg: JobConfig,
    partition: int,
    global_vec: NDArray[np.float32],
    round_no: int,
    support: NDArray[np.int64] | None,
    residual: NDArray[np.float32] | None,
    moments: tuple[NDArray[np.float32], NDArray[np.float32], float] | None = None,
) -> tuple[LocalResult, NDArray[np.float32] | None, tuple[NDArray[np.float32], ...]]:
    """Train `local_steps` from the global adapter; return the (DP, sparsified) update.

    Batches are those of steps ``(round_no - 1) * local_steps + k`` of this silo's stream, so a
    restarted job replays exactly the same data. The update is local minus global. ``moments``
    (``federation.local_optimizer: persistent``) continue this silo's AdamW from its last round;
    the new ones are returned as the third value.
    """
    job, stream = _stream(cfg, partition)
    fed = cfg.federation
    load_flat(job.model, global_vec)
    optimizer = make_optimizer(job.model, cfg.train)
    if moments is not None:
        restore_moments(optimizer, trainable(job.model), moments)
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
    return result, new_residual, optimizer_moments(optimizer, trainable(job.model))


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


def _he_keys(context: Context) -> he.HeKeys:
    state = _state(context)
    if "he_secret" not in state:
        raise FederationError("this silo holds no HE key; the key setup did not reach it")
    return he.HeKeys.load(bytes(state["he_secret"]))  # type: ignore[arg-type]


def _residual(context: Context, cfg: JobConfig, length: int) -> NDArray[np.float32] | None:
    if not (cfg.federation.pruning.enabled and cfg.federation.pruning.error_feedback):
        return None
    if _RESIDUAL in context.state.array_records:
        res = context.state.array_records[_RESIDUAL]["r"].numpy()
        if res.shape == (length,):
            return res.astype(np.float32)
    return np.zeros(length, dtype=np.float32)


def _partition(context: Context) -> int:
    if "partition-id" not in context.node_config and "config" in context.node_config:
        return 0  # deployment: the silo trains on all of its own data; the id only seeds batches
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
    persistent = cfg.federation.local_optimizer == "persistent"
    moments = _moments(context) if persistent else None
    result, new_residual, new_moments = local_round(
        cfg, _partition(context), global_vec, round_no, support, residual, moments
    )
    if new_residual is not None:
        context.state[_RESIDUAL] = ArrayRecord({"r": to_array(new_residual)})
    if persistent:
        m, v, step = new_moments
        state = {"m": to_array(m), "v": to_array(v), "step": to_array(np.array([step]))}
        context.state[_OPTIMIZER] = ArrayRecord(state)
    return result, round_no


def _moments(context: Context) -> tuple[NDArray[np.float32], NDArray[np.float32], float] | None:
    """This silo's AdamW state from its previous round, if it trained one in this process."""
    if _OPTIMIZER not in context.state.array_records:
        return None
    record = context.state.array_records[_OPTIMIZER]
    m, v = record["m"].numpy().astype(np.float32), record["v"].numpy().astype(np.float32)
    return m, v, float(record["step"].numpy()[0])


def _summary(result: LocalResult) -> dict[str, Any]:
    return {"examples": result.examples, "loss": result.loss, "update_norm": result.update_norm}


def _job_id(content: RecordDict) -> bytes:
    """The job id the coordinator named (bound into every signature of the job)."""
    try:
        job = bytes.fromhex(str(get_config(content).get("job", "")))
    except ValueError:
        job = b""
    if len(job) != 16:
        raise FederationError("the coordinator's message lacks a 16-byte 'job' id")
    return job


def _signed_key(context: Context, trust: SiloTrust, job: bytes) -> tuple[dict[str, Any], str]:
    """This silo's transport public key and its identity signature, as reply arrays + name."""
    tpk = sealing.public_bytes(transport_key(context))
    name, sig = trust.sign(tpk, job)
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
    trust.verify(table, what, _job_id(content))
    return {peer: pk for peer, (_, pk, _) in table.items()}


def silo_policy(cfg: JobConfig, trust: SiloTrust) -> SiloPolicy:
    """What this silo's own config demands of every round (the coordinator cannot lower it)."""
    fed = cfg.federation
    return SiloPolicy(
        fed.secure_aggregation,
        fed.min_silos,
        fed.secagg_clip,
        fed.weighting,
        fed.max_examples,
        authenticated=trust.enabled,
    )


def _method(action: str) -> str:
    if action == PLAIN:
        return "none"
    return "masking" if action in MASK_ACTIONS else "he"


def _history(context: Context, key: str) -> dict[str, int]:
    raw = _state(context).get(key)
    return {str(k): int(v) for k, v in json.loads(str(raw)).items()} if raw else {}


def _keep_history(context: Context, key: str, history: dict[str, int]) -> None:
    _state(context)[key] = json.dumps(history)


def handle(
    cfg: JobConfig, action: str, message: Message, context: Context, trust: SiloTrust
) -> RecordDict:
    """Answer one stage message: the silo's policy is checked before any work or any upload."""
    if action not in ACTIONS:
        raise ValueError(f"Unknown stage: {action!r}; expected one of {ACTIONS}.")
    policy = silo_policy(cfg, trust)
    policy.require(_method(action))
    if not trust.enabled and action in (PLAIN, HE_TRAIN, MASK_SETUP):
        log.warning(
            "this silo runs without identities (federation.allow_unauthenticated): an active "
            "coordinator could substitute peers' keys and read its update"
        )
    content = message.content
    if action == PLAIN:
        result, _ = _train_from(message, context, cfg)
        return records({"update": to_array(result.values)}, **_summary(result))
    if action == HELLO:
        _, stream = _stream(cfg, _partition(context))
        arrays, name = _signed_key(context, trust, _job_id(content))
        return records(arrays, examples=len(stream.examples), identity=name)
    if action == HE_KEYGEN:
        return _he_keygen(content, context, trust)
    if action == HE_INSTALL:
        return _he_install(content, context, trust)
    if action == HE_TRAIN:
        return _he_train(cfg, message, context, trust)
    if action == HE_DECRYPT:
        history = _history(context, "he_history")
        guard = DecryptionGuard(policy, trust.enrollment, history)
        length = int(get_config(content)["length"])  # type: ignore[arg-type]
        try:
            total, sig, _ = guard.decrypt(
                _he_keys(context),
                get_bytes(content, "arrays", "request"),
                length,
                trust.key,
                trust.name,
            )
        finally:
            _keep_history(context, "he_history", history)
        return records({"sum": to_array(total), "signature": to_array(sig)})
    return _masking(cfg, action, message, context, trust, policy)


def _he_keygen(content: RecordDict, context: Context, trust: SiloTrust) -> RecordDict:
    """Key leader: make the HE keys, keep the secret, seal it to each peer, return the public part."""
    keys = he.HeKeys.generate(he.HeParams(clip=float(get_config(content)["clip"])))  # type: ignore[arg-type]
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
    keys = he.HeKeys.load(secret)
    if not keys.is_private:
        raise FederationError("the key leader sent a public-only HE context")
    _state(context)["he_secret"] = secret
    return records(installed=True)


def _he_train(cfg: JobConfig, message: Message, context: Context, trust: SiloTrust) -> RecordDict:
    """Train, encrypt ``weight * update`` and sign (ciphertext, examples, weight, job, round)."""
    conf = get_config(message.content)
    weight = conf.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, float) or not 0 < weight <= 1:
        raise FederationError(f"the round's weight must be a number in (0, 1], got {weight!r}")
    job = _job_id(message.content)
    result, round_no = _train_from(message, context, cfg)
    blob = he.encrypt_update(_he_keys(context), result.values, weight)
    item = Contribution.sign(trust.key, job, round_no, trust.name, blob, result.examples, weight)
    arrays = {"ciphertext": to_array(blob), "signature": to_array(item.signature)}
    return records(arrays, identity=trust.name, **_summary(result))


def _masking(
    cfg: JobConfig,
    action: str,
    message: Message,
    context: Context,
    trust: SiloTrust,
    policy: SiloPolicy,
) -> RecordDict:
    """The authenticated masking stages (:mod:`silotune.secagg`); Flower only carries bytes."""
    content, state = message.content, _state(context)
    incoming = get_bytes(content, "arrays", "msg")
    history = _history(context, "mask_history")
    name = trust.name or f"node-{context.node_id}"
    extra: dict[str, Any] = {}
    if action == MASK_SETUP:
        result, _ = _train_from(message, context, cfg)
        context.state[_PENDING] = ArrayRecord({"values": to_array(result.values)})
        party = MaskingSilo(policy, trust.key, trust.enrollment, name, history)
        reply = party.advertise(incoming, result.examples)
        extra = {"loss": result.loss, "update_norm": result.update_norm}
    else:
        party = MaskingSilo.restore(
            bytes(state["masking"]),  # type: ignore[arg-type]
            policy,
            trust.key,
            trust.enrollment,
            name,
            history,
        )
        stage = MASK_STAGES[MASK_ACTIONS.index(action)]
        update = None
        if action == MASK_COLLECT:
            update = context.state.array_records[_PENDING]["values"].numpy()
        reply = party.handle(stage, incoming, update=update)
        if action == MASK_COLLECT:
            del context.state[_PENDING]
    state["masking"] = party.export_state()
    _keep_history(context, "mask_history", history)
    return records({"msg": to_array(reply)}, **extra)


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
        _CONFIGS.clear()  # a worker serves one job: keep only its config
        _CONFIGS[key] = load_config(path)
    return _CONFIGS[key]


_TRUST: dict[tuple[str | None, str | None], SiloTrust] = {}


def _trust_from_config(cfg: JobConfig) -> SiloTrust:
    """A deployed silo's identity and enrollment; required unless allow_unauthenticated."""
    fed = cfg.federation
    key = (fed.identity_key, fed.enrollment)
    if key not in _TRUST:
        trust = SiloTrust.from_files(*key)
        if not trust.enabled and fed.secure_aggregation != "none" and not fed.allow_unauthenticated:
            raise ConfigError(
                "a deployed silo needs federation.identity_key and federation.enrollment (from "
                "silotune keygen) so that peers' keys can be checked; set "
                "federation.allow_unauthenticated: true to run without them"
            )
        _TRUST.clear()  # one job's identity at a time
        _TRUST[key] = trust
    return _TRUST[key]


def simulated_workers(cfg: JobConfig) -> int:
    """Silos that Flower's simulation runs at once on this machine: one per core, at most all."""
    return max(1, min(cores(), cfg.federation.silos))


def silo_threads(cfg: JobConfig) -> int:
    """Torch threads of a silo: its share of the cores when silos are simulated side by side."""
    return threads_per_process(cfg, simulated_workers(cfg) if cfg.federation.simulation else 1)


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
            apply_threads(silo_threads(job_cfg))
            mine = trust[_partition(context)] if trust is not None else _trust_from_config(job_cfg)
            return Message(handle(job_cfg, action, message, context, mine), reply_to=message)

        app.train(action)(stage)
    return app
