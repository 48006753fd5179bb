"""The enclave app of adapter placement `enclave`: LoRA, its optimizer and the data live only here.

Inside the enclave this app builds the job exactly as the centralized trainer does (same model,
same seeded LoRA initialisation, same batches, same AdamW and schedule, same torch RNG stream) and
then swaps every frozen linear layer for one the REE computes on masked tensors
(:mod:`silotune.adapter_tee.masked_linear`). Everything else - embeddings, norms, rotary attention,
SiLU, residuals, the LoRA branches, the loss, the optimizer - runs here on unmasked values.

Methods (the host drives them in order; each does its work once, so the REE cannot make the
enclave recompute a batch and hand it several independently masked copies to average):

* ``preprocess``: with ``unblinding: offline``, draw the masks and compute the unblinding factors
  the next step needs (Slalom's offline phase; it reads no data, only the next batch's shape).
  Returns what it cost and the pool's size. With ``online`` it does nothing.
* ``train_step`` ``{"step": k}``: optimizer step ``k``; ``k`` must be the enclave's next step.
  Returns the step's loss, gradient norm, learning rate and what the outsourcing cost (with any
  preprocessing the step had to do itself because the pool ran short, reported apart).
* ``evaluate`` ``{"split": "validation" | "test"}``: validation at the steps the schedule names
  (every ``train.eval_every`` and the last), test once after the last step. Returns the scores.
* ``release``: after the last step only, the trained adapter's tensors (PEFT names).
* ``checkpoint``: the whole training state (adapter, AdamW, schedule, RNG, step) sealed to this
  measurement on this platform (:mod:`silotune.adapter_tee.state`); the host stores the blob.
* ``restore`` ``{"length": n}`` + ``blob``: before the first step only, continue from a sealed
  state. It opens only in an enclave with the same code and configuration on the same platform.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import torch

from silotune.adapter_tee.mask_pool import MaskPool
from silotune.adapter_tee.masked_linear import LinearOffload, outsource_linears
from silotune.adapter_tee.masked_stream import MaskStream
from silotune.adapter_tee.state import STATE_LABEL, pack_state, unpack_state
from silotune.adapters.peft_adapters import adapter_state, attach_adapter
from silotune.config import JobConfig, config_from_dict
from silotune.data.registry import load_splits
from silotune.data.tasks import make_task
from silotune.enclave.base import EnclaveError, OcallHandler, Tensors
from silotune.enclave.ipc import take_bytes
from silotune.errors import ConfigError, ModelError
from silotune.eval.evaluate import evaluate
from silotune.models.loading import load_model
from silotune.models.presets import PRESETS, smollm2_folder
from silotune.train.job import Job
from silotune.train.loop import BatchStream, make_optimizer, make_scheduler, train_step
from silotune.train.schedule import Schedule

__all__ = [
    "ENCLAVE_MODEL_TYPES",
    "AdapterEnclaveApp",
    "build_enclave_job",
    "check_enclave_job",
    "checked_app_config",
    "enclave_app_config",
    "model_digest",
]

# Decoder families whose every frozen matmul is an nn.Linear (GPT-2's Conv1D is not).
ENCLAVE_MODEL_TYPES = ("llama", "mistral", "qwen2")
_JOB_SECTIONS = ("model", "adapter", "data", "train")


def check_enclave_job(cfg: JobConfig) -> None:
    """Refuse, with one sentence, a job that adapter placement `enclave` cannot run."""
    if cfg.adapter.placement != "enclave":
        raise ConfigError("adapter.placement must be 'enclave' for the adapter-in-TEE runner")
    if cfg.adapter.type != "lora":
        raise ConfigError(
            f"adapter.placement enclave supports adapter.type lora only, got '{cfg.adapter.type}'"
        )
    if cfg.adapter.spf.enabled:
        raise ConfigError("adapter.spf.enabled is not supported with adapter.placement enclave")
    if cfg.model.dtype not in ("auto", "float32"):
        raise ConfigError(
            f"adapter.placement enclave computes in float32 (masks would drown bfloat16/float16 "
            f"precision); set model.dtype to float32 or auto, not '{cfg.model.dtype}'"
        )


def model_digest(name: str) -> str | None:
    """SHA-256 over every file of the model's folder (weights, config, tokenizer), hex.

    ``None`` for ``tiny-llama``, which is built from code and a seed that the measurement covers.
    """
    if name == "tiny-llama":
        return None
    folder = smollm2_folder() if name == "smollm2-135m" else Path(name).expanduser()
    if not folder.is_dir():
        raise ModelError(f"model '{name}' is neither a preset ({', '.join(PRESETS)}) nor a folder")
    digest = hashlib.sha256(b"silotune/model-folder/v1\x00")
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(path.name.encode("utf-8") + b"\x00" + path.stat().st_size.to_bytes(8, "big"))
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def enclave_app_config(cfg: JobConfig) -> dict[str, Any]:
    """The measured configuration of the adapter app: the recipe, the weights' hash, the masks.

    The enclave always computes on its CPU in float32; ``model.device`` is where the REE runs.
    Binding the hash of the model's files into the measurement means a verifier who accepts the
    measurement accepts exactly those frozen weights, and the enclave refuses to start on others.
    """
    job = cfg.model_dump(mode="json", include=set(_JOB_SECTIONS))
    job["model"] = {**job["model"], "device": "cpu", "dtype": "float32"}
    job["train"].pop("threads", None)  # this machine's setting, not the recipe's
    return {
        "job": job,
        "model_sha256": model_digest(cfg.model.name),
        "mask_std": cfg.enclave.mask_std,
        "unblinding": cfg.enclave.unblinding,
        "mask_pool_tokens": cfg.enclave.mask_pool_tokens,
    }


def checked_app_config(config: dict[str, Any]) -> tuple[JobConfig, float]:
    """The job and mask scale of a measured app configuration, after checking the model files."""
    job = config.get("job")
    mask_std = config.get("mask_std")
    if not isinstance(job, dict) or not isinstance(mask_std, (int, float)) or mask_std <= 0:
        raise EnclaveError("the adapter app needs config {'job': {...}, 'mask_std': > 0}")
    cfg = config_from_dict(job)
    found = model_digest(cfg.model.name)
    if found != config.get("model_sha256"):
        raise EnclaveError(
            f"the model files of '{cfg.model.name}' hash to {found}, but the measured "
            f"configuration names {config.get('model_sha256')}; refusing other weights"
        )
    return cfg, float(mask_std)


def build_enclave_job(cfg: JobConfig, offload: LinearOffload) -> Job:
    """The job as :func:`~silotune.train.job.build_job` builds it, frozen linears outsourced.

    Same model, same seeded LoRA initialisation, same encoded training split and batch stream;
    every frozen ``nn.Linear`` is replaced before the adapter wraps it, so the LoRA branches
    stay here and only the frozen products go to the REE, on masked tensors.
    """
    loaded = load_model(cfg.model.name, "cpu", "float32", seed=cfg.train.seed)
    kind = loaded.model.config.model_type
    if kind not in ENCLAVE_MODEL_TYPES:
        raise ConfigError(
            f"adapter.placement enclave supports model types {', '.join(ENCLAVE_MODEL_TYPES)}; "
            f"'{cfg.model.name}' is '{kind}'"
        )
    outsource_linears(loaded.model, offload)
    model = attach_adapter(loaded.model, cfg.adapter, seed=cfg.train.seed)
    splits = load_splits(cfg.data, seed=cfg.train.seed)
    task = make_task(
        loaded.tokenizer,
        cfg.data.task,
        splits.labels,
        splits.prompt_template,
        cfg.data.max_length,
    )
    encoded = [task.encode(ex) for ex in splits.train]
    stream = BatchStream(
        encoded, cfg.train.batch_size, cfg.train.seed, loaded.tokenizer.pad_token_id
    )
    return Job(cfg, model, task, splits, stream, torch.device("cpu"))


class AdapterEnclaveApp:
    """See the module docstring; constructed inside the enclave as ``Cls(config, runtime)``."""

    def __init__(self, config: dict[str, Any], runtime: Any = None, seed: bytes | None = None):
        cfg, mask_std = checked_app_config(config)
        self.cfg = cfg
        self.runtime = runtime
        self._lock = threading.Lock()
        # The mask key is made here (os.urandom unless a test fixes it) and never leaves.
        masks = MaskStream(seed)
        self.offload = LinearOffload(masks, float(mask_std))
        unblinding = config.get("unblinding", "online")
        pool_tokens = config.get("mask_pool_tokens")
        if unblinding not in ("offline", "online") or not (
            pool_tokens is None or (isinstance(pool_tokens, int) and pool_tokens > 0)
        ):
            raise EnclaveError(
                f"unblinding must be 'offline' or 'online' (got {unblinding!r}) and "
                f"mask_pool_tokens a positive int or None (got {pool_tokens!r})"
            )
        if unblinding == "offline":
            # Sites are learned on the first pass; from then on `preprocess` tops them up.
            self.offload.pool = MaskPool(masks, self.offload.weight64, pool_tokens or 1)
        self.pool_tokens = pool_tokens
        job = build_enclave_job(cfg, self.offload)
        self.model = job.model
        self.splits = job.splits
        self.task = job.task
        self.stream = job.stream
        self.device = job.device
        self.optimizer = make_optimizer(self.model, cfg.train)
        self.scheduler = make_scheduler(self.optimizer, cfg.train)
        # The trainer seeds the global torch RNG with train.seed before step 0 (LoRA dropout);
        # this app keeps its own copy of that stream so it never disturbs anyone else's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            self._rng = torch.get_rng_state()
        self.step = 0
        self._restored = False
        self._evaluated: set[tuple[str, int]] = set()

    def handle(
        self, method: str, meta: dict[str, Any], tensors: Tensors, ocall: OcallHandler
    ) -> tuple[dict[str, Any], Tensors]:
        """Answer one call from the host (see the module docstring)."""
        with self._lock:
            self.offload.ocall = ocall
            try:
                if method == "preprocess":
                    return self._preprocess(), {}
                if method == "train_step":
                    return self._train_step(meta), {}
                if method == "evaluate":
                    return self._evaluate(meta), {}
                if method == "release":
                    return self._release()
                if method == "checkpoint":
                    return self._checkpoint()
                if method == "restore":
                    return self._restore(meta, tensors), {}
                raise EnclaveError(
                    f"the adapter app has no method {method!r} (preprocess, train_step, "
                    "evaluate, release, checkpoint, restore)"
                )
            finally:
                self.offload.ocall = None
                self.offload.forget()

    def _costs(self) -> dict[str, float]:
        """What outsourcing and preprocessing cost since the last call that reported it."""
        cost = self.offload.take_stats().as_dict()
        pool = self.offload.pool
        if pool is not None:
            cost.update(pool.take_stats().as_dict())
            cost["pool_bytes"] = pool.nbytes()
        return cost

    def _preprocess(self) -> dict[str, Any]:
        """Top the mask pool up to what the next training step needs (offline unblinding)."""
        pool = self.offload.pool
        if pool is None:
            return {"unblinding": "online"}
        t = self.cfg.train
        need = 0
        if self.step < t.max_steps:  # the rows (tokens) of the next step's micro-batches
            for micro in range(t.grad_accum):
                batch = self.stream.micro_batch(self.step * t.grad_accum + micro)
                need += int(batch["input_ids"].numel())
        pool.fill(max(need, self.pool_tokens or 0))
        return {"unblinding": "offline", "rows": need, **self._costs()}

    def _train_step(self, meta: dict[str, Any]) -> dict[str, Any]:
        step = meta.get("step")
        if step != self.step:
            raise EnclaveError(
                f"train_step {step!r} asked for, but the enclave's next step is {self.step}; "
                "every step runs exactly once, in order"
            )
        if self.step >= self.cfg.train.max_steps:
            raise EnclaveError(f"training is over: all {self.cfg.train.max_steps} steps ran")
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng)
            out = train_step(
                self.model,
                self.stream,
                self.step,
                self.optimizer,
                self.scheduler,
                self.cfg.train,
                self.device,
            )
            self._rng = torch.get_rng_state()
        self.step += 1
        cost = self._costs()
        return {
            "step": self.step,
            "loss": out.loss,
            "grad_norm": out.grad_norm,
            "lr": out.lr,
            "enclave_s": time.perf_counter() - start,
            **cost,
        }

    def _evaluate(self, meta: dict[str, Any]) -> dict[str, Any]:
        split = meta.get("split")
        t = self.cfg.train
        if split == "validation":
            scheduled = self.step > 0 and Schedule.steps(self.cfg).evaluates(self.step)
            examples = self.splits.validation
        elif split == "test":
            scheduled = self.step == t.max_steps
            examples = self.splits.test
        else:
            raise EnclaveError(f"evaluate split must be 'validation' or 'test', got {split!r}")
        if not scheduled or (split, self.step) in self._evaluated:
            raise EnclaveError(
                f"no {split} evaluation is due at step {self.step} (validation every "
                f"{t.eval_every} steps and at the last, test once at the end; each runs once)"
            )
        self._evaluated.add((split, self.step))
        scores = evaluate(self.model, self.task, examples, t.eval_batch_size, self.device)
        cost = self._costs()
        return {"scores": scores, "cost": cost}

    def _checkpoint(self) -> tuple[dict[str, Any], Tensors]:
        if self.runtime is None:
            raise EnclaveError("sealing the training state needs an enclave runtime")
        state = pack_state(self.step, self.model, self.optimizer, self.scheduler, self._rng)
        blob = self.runtime.seal(state, STATE_LABEL)
        return {"step": self.step, "length": len(blob)}, {"blob": blob}

    def _restore(self, meta: dict[str, Any], tensors: Tensors) -> dict[str, Any]:
        if self.runtime is None:
            raise EnclaveError("unsealing a training state needs an enclave runtime")
        if self.step != 0 or self._restored:
            raise EnclaveError("a sealed state is restored once, before the first step")
        blob = take_bytes(tensors, "blob")
        state = self.runtime.unseal(blob, STATE_LABEL)
        self.step, self._rng = unpack_state(state, self.model, self.optimizer, self.scheduler)
        self._restored = True
        return {"step": self.step}

    def _release(self) -> tuple[dict[str, Any], Tensors]:
        if self.step != self.cfg.train.max_steps:
            raise EnclaveError(
                f"the adapter is released only after the last step ({self.cfg.train.max_steps}); "
                f"the enclave is at step {self.step}"
            )
        return {"step": self.step}, adapter_state(self.model)
