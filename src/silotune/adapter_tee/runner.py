"""The REE's side of adapter placement `enclave`: serve masked matmuls, drive the enclave, save.

The host process (the REE) loads the frozen model and answers the enclave's ``linear`` and
``linear_t`` ocalls with it (:class:`~silotune.adapter_tee.masked_linear.FrozenLinearServer`); it
never holds the adapter, its optimizer state, the training data or an unmasked activation. It
starts the enclave (:mod:`silotune.adapter_tee.app`), checks its quote, asks for each step
and each scheduled evaluation, and at the end writes the adapter the enclave releases as a plain
PEFT folder. :func:`compare_with_plain` runs the same recipe with the ordinary trainer and with
the enclave and reports measured step times and how far apart the two adapters are.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch

from silotune.adapter_tee.app import (
    ENCLAVE_MODEL_TYPES,
    AdapterEnclaveApp,
    check_enclave_job,
    enclave_app_config,
)
from silotune.adapter_tee.masked_linear import FrozenLinearServer
from silotune.adapters.peft_adapters import (
    adapter_state,
    attach_adapter,
    save_adapter,
    set_adapter_state,
)
from silotune.config import JobConfig, config_from_dict
from silotune.crypto.identity import IdentityKey
from silotune.enclave.base import (
    AttestationPolicy,
    EnclaveError,
    OcallHandler,
    Tensors,
    verify_quote,
)
from silotune.enclave.ipc import take_bytes
from silotune.enclave.measure import measure
from silotune.enclave.platform import load_platform_key
from silotune.enclave.simulated import SimulatedEnclave
from silotune.errors import CheckpointError, ConfigError
from silotune.models.loading import LoadedModel, load_model
from silotune.progress import progress_bar
from silotune.train.checkpoint import CHECKPOINTS, checkpoint_dirs, latest_checkpoint
from silotune.train.job import build_job
from silotune.train.loop import StepOutput, make_optimizer, make_scheduler, train_step
from silotune.train.run_folder import (
    ADAPTER_DIR,
    METRICS_FILE,
    MetricsLog,
    check_output_dir,
    format_scores,
    reset_output_dir,
    train_record,
    write_summary,
)
from silotune.train.schedule import Schedule
from silotune.train.threads import apply_threads, threads_per_process

__all__ = [
    "APP",
    "LocalEnclave",
    "compare_unblinding",
    "compare_with_plain",
    "open_adapter_enclave",
    "train_in_enclave",
]

log = logging.getLogger(__name__)

APP = "adapter"
SEALED_STATE = "enclave_state.sealed"


class EnclaveCalls(Protocol):
    """What the runner needs of an enclave: its measurement and ``call``."""

    @property
    def measurement(self) -> bytes: ...

    def call(
        self,
        method: str,
        meta: dict[str, Any],
        tensors: Tensors,
        ocall: OcallHandler | None = None,
    ) -> tuple[dict[str, Any], Tensors]: ...


class LocalEnclave:
    """The adapter app called in this process, behind the same ``call`` seam (tests, profiling).

    It isolates nothing and cannot be attested; it exists so that the masked protocol can be
    checked and timed without the process boundary. Training runs use
    :class:`~silotune.enclave.simulated.SimulatedEnclave`.
    """

    def __init__(self, app_config: dict[str, Any], seed: bytes | None = None) -> None:
        self.measurement = measure(APP, app_config)
        self.app = AdapterEnclaveApp(app_config, None, seed=seed)

    def call(
        self,
        method: str,
        meta: dict[str, Any],
        tensors: Tensors,
        ocall: OcallHandler | None = None,
    ) -> tuple[dict[str, Any], Tensors]:
        """Run ``method`` of the app here, serving its ocalls with ``ocall``."""

        def refuse(
            name: str, _meta: dict[str, Any], _tensors: Tensors
        ) -> tuple[dict[str, Any], Tensors]:
            raise RuntimeError(f"the enclave made an ocall {name!r} but the call has no handler")

        return self.app.handle(method, meta, tensors, ocall or refuse)


@contextmanager
def open_adapter_enclave(cfg: JobConfig) -> Iterator[SimulatedEnclave]:
    """Start the adapter app in a simulated enclave and verify its quote before any use.

    The platform key is ``enclave.platform_key`` or, if unset, a throwaway one; the accepted
    measurements are ``enclave.allowed_measurements`` or, if empty, the one this build computes.
    """
    app_config = enclave_app_config(cfg)
    key = (
        load_platform_key(cfg.enclave.platform_key)
        if cfg.enclave.platform_key is not None
        else IdentityKey.generate()
    )
    allowed = cfg.enclave.allowed_measurements or [measure(APP, app_config).hex()]
    threads = threads_per_process(cfg, 2)  # the enclave's process and this one
    apply_threads(threads)
    enclave = SimulatedEnclave.start(APP, app_config, key, threads=threads)
    try:
        nonce = os.urandom(32)
        verify_quote(enclave.attest(nonce), AttestationPolicy.from_hex(key.public, allowed), nonce)
        log.info("Adapter enclave attested (simulated), measurement %s", enclave.measurement.hex())
        yield enclave
    finally:
        enclave.close()


def load_ree_model(cfg: JobConfig) -> LoadedModel:
    """The REE's frozen model, in float32 on ``model.device``; Llama-family only."""
    loaded = load_model(cfg.model.name, cfg.model.device, "float32", seed=cfg.train.seed)
    kind = loaded.model.config.model_type
    if kind not in ENCLAVE_MODEL_TYPES:
        raise ConfigError(
            f"adapter.placement enclave supports model types {', '.join(ENCLAVE_MODEL_TYPES)}; "
            f"model '{cfg.model.name}' is '{kind}'"
        )
    return loaded


def train_in_enclave(
    cfg: JobConfig, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train with the adapter in a (simulated) enclave; the summary is also in summary.json.

    With ``enclave.platform_key`` set, the enclave's whole training state is sealed at every
    evaluation (``checkpoints/step-N/enclave_state.sealed``), and ``resume`` continues from the
    newest one in a new enclave with the same measurement on the same platform.

    Raises
    ------
    ConfigError
        For jobs the enclave cannot run (see :func:`~silotune.adapter_tee.app.
        check_enclave_job`) and for ``resume`` without ``enclave.platform_key``.
    CheckpointError
        If the sealed state does not open in this enclave.
    """
    check_enclave_job(cfg)
    if resume and cfg.enclave.platform_key is None:
        raise ConfigError(
            "--resume with adapter.placement enclave needs enclave.platform_key: the sealed "
            "training state opens only on the platform that sealed it, and a run without a key "
            "uses a throwaway one"
        )
    check_output_dir(cfg, resume=resume, overwrite=overwrite)
    ree = load_ree_model(cfg)
    server = FrozenLinearServer.from_model(ree.model)
    t = cfg.train
    with open_adapter_enclave(cfg) as enclave:
        # A bad model or data set fails above, in the enclave's start, before an old run goes.
        start = _restore(cfg, enclave, server) if resume else 0
        if not resume:
            reset_output_dir(cfg)
        metrics = MetricsLog(cfg.output_dir / METRICS_FILE, start if resume else None)
        schedule = Schedule.steps(cfg)
        clock = time.perf_counter()
        with progress_bar(progress) as bar:
            task_id = bar.add_task(
                "train (enclave)", total=t.max_steps, completed=start, note="loss -"
            )
            for step in range(start, t.max_steps):
                # Offline unblinding: the masks and factors for this step, before it.
                enclave.call("preprocess", {}, {}, server)
                info, _ = enclave.call("train_step", {"step": step}, {}, server)
                done = step + 1
                bar.update(task_id, advance=1, note=f"loss {info['loss']:.4f}")
                if schedule.logs(done):
                    metrics.write(_record(done, info, time.perf_counter() - clock))
                if schedule.evaluates(done):
                    scores = _evaluate(enclave, "validation", server)
                    metrics.write({"step": done, "split": "validation", **scores})
                    log.info("step %d validation %s", done, format_scores(scores))
                    if cfg.enclave.platform_key is not None:
                        _save_sealed(cfg, enclave, server)
        train_s = time.perf_counter() - clock
        _, released = enclave.call("release", {}, {}, server)
        test = _evaluate(enclave, "test", server)
        measurement = enclave.measurement.hex()
    # The REE learns the adapter only here, from what the enclave released after the last step.
    peft_model = attach_adapter(ree.model, cfg.adapter, seed=t.seed)
    set_adapter_state(peft_model, released)
    save_adapter(peft_model, cfg.output_dir / ADAPTER_DIR)
    metrics.write({"step": t.max_steps, "split": "test", **test})
    return write_summary(
        cfg,
        train_s,
        test,
        adapter_placement="enclave",
        enclave_backend="simulated",
        enclave_measurement=measurement,
    )


def _save_sealed(cfg: JobConfig, enclave: EnclaveCalls, server: FrozenLinearServer) -> Path:
    """Store the enclave's sealed training state as checkpoint ``step-N``, atomically."""
    info, tensors = enclave.call("checkpoint", {}, {}, server)
    blob = take_bytes(tensors, "blob")
    root = cfg.output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{int(info['step']):08d}"
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        (staging / SEALED_STATE).write_bytes(blob)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in checkpoint_dirs(cfg.output_dir)[: -cfg.train.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _restore(cfg: JobConfig, enclave: EnclaveCalls, server: FrozenLinearServer) -> int:
    """Hand the newest sealed state to a fresh enclave; returns the step it continues from."""
    ckpt = latest_checkpoint(cfg.output_dir)
    path = ckpt / SEALED_STATE if ckpt is not None else None
    if path is None or not path.is_file():
        raise CheckpointError(f"--resume: {cfg.output_dir} holds no sealed enclave state")
    blob = path.read_bytes()
    try:
        info, _ = enclave.call("restore", {"length": len(blob)}, {"blob": blob}, server)
    except EnclaveError as err:
        raise CheckpointError(
            f"--resume: the sealed enclave state {path} does not open in this enclave ({err}); "
            "it needs the same config, the same silotune code and the same enclave.platform_key"
        ) from None
    start = int(info["step"])
    if start > cfg.train.max_steps:
        raise ConfigError(
            f"--resume: the checkpoint is at step {start}, past train.max_steps "
            f"{cfg.train.max_steps}"
        )
    log.info("Resuming in the enclave from %s (step %d)", path, start)
    return start


def _record(step: int, info: dict[str, Any], elapsed_s: float) -> dict[str, Any]:
    """A metrics.jsonl train record: the trainer's fields plus what outsourcing cost."""
    out = StepOutput(float(info["loss"]), float(info["grad_norm"]), float(info["lr"]))
    record = train_record(step, out, elapsed_s)
    record.update({k: info[k] for k in ("enclave_s", "ocalls", "masks", "bytes_sent")})
    return record


def _evaluate(enclave: EnclaveCalls, split: str, server: FrozenLinearServer) -> dict[str, float]:
    info, _ = enclave.call("evaluate", {"split": split}, {}, server)
    scores: dict[str, float] = info["scores"]
    return scores


def compare_with_plain(
    cfg_dict: dict[str, Any], steps: int, in_process: bool = False, mask_seed: bytes | None = None
) -> dict[str, Any]:
    """Train ``steps`` steps of one recipe with the plain trainer and with the adapter in the enclave.

    Parameters
    ----------
    cfg_dict
        A job config (as in a YAML recipe); ``adapter.placement`` and ``train.max_steps`` are
        set here. Both runs compute in float32. ``enclave.unblinding`` picks offline or online
        unblinding factors.
    steps
        Optimizer steps of each run.
    in_process
        Call the enclave app in this process instead of a separate simulated enclave process
        (no attestation, no process boundary; for tests and profiling).
    mask_seed
        Fix the mask key (in-process only; a real enclave always draws its own).

    Returns
    -------
    dict
        ``plain_step_s`` and ``enclave_step_s`` (median seconds per optimizer step; the
        enclave's is the online step: the process boundary, the masking, the unblinding and the
        checks of the REE's answers, less any preprocessing the step had to do itself, which
        ``enclave_step_wall_s`` includes), ``preprocess_s`` (median seconds of the offline
        phase per step, ``preprocess_total_s`` all of it), ``pool_mib`` (the mask pool's
        largest size), ``max_abs_diff`` (largest difference between the two trained adapters'
        tensors), ``rel_diff`` (Frobenius norm of the difference over that of the plain
        adapter), ``elements_over_1e-5`` of ``elements``, ``max_loss_diff``, the per-step losses
        and times, and the enclave's cost breakdown per step (medians: ``unblind_s``,
        ``mask_s``, ``ocall_s``, ``verify_s``). AdamW divides by ``sqrt(v) + 1e-8``, so a
        gradient element near 1e-9, where two float32 computations legitimately differ, moves by
        a sizeable fraction of the learning rate in one and not the other: ``max_abs_diff`` then
        measures that, and the other fields show how few elements it concerns
        (docs/adapter-in-tee.md).
    """
    compared = compare_unblinding(cfg_dict, steps, (None,), in_process, mask_seed)
    (result,) = (v for k, v in compared.items() if k != "plain")
    return {"plain_step_s": compared["plain"]["step_s"], **result}


def compare_unblinding(
    cfg_dict: dict[str, Any],
    steps: int,
    modes: tuple[str | None, ...] = ("online", "offline"),
    in_process: bool = False,
    mask_seed: bytes | None = None,
) -> dict[str, dict[str, Any]]:
    """The plain trainer once, then the enclave with each ``enclave.unblinding`` of ``modes``.

    ``None`` in ``modes`` keeps the recipe's own setting. Returns ``{"plain": {"step_s",
    "step_times", "losses"}, MODE: {...}}``, each mode's entry as :func:`compare_with_plain`
    describes (``plain_step_s`` aside).
    """
    if steps <= 0:
        raise ConfigError(f"steps must be positive, got {steps}")
    fixed = [f"train.max_steps={steps}", "model.dtype=float32"]
    plain_cfg = config_from_dict(cfg_dict, fixed + ["adapter.placement=ree"])
    plain_times, plain_losses, plain_adapter = _run_plain(plain_cfg)
    out: dict[str, dict[str, Any]] = {
        "plain": {
            "step_s": statistics.median(plain_times),
            "step_times": plain_times,
            "losses": plain_losses,
        }
    }
    for mode in modes:
        unblinding = [f"enclave.unblinding={mode}"] if mode is not None else []
        enclave_cfg = config_from_dict(cfg_dict, fixed + ["adapter.placement=enclave", *unblinding])
        check_enclave_job(enclave_cfg)
        run = _run_enclave(enclave_cfg, in_process, mask_seed)
        released = run.pop("released")
        out[enclave_cfg.enclave.unblinding] = {
            **run,
            **_adapter_gap(plain_adapter, released),
            "max_loss_diff": max(
                abs(a - b) for a, b in zip(plain_losses, run["enclave_losses"], strict=True)
            ),
            "plain_losses": plain_losses,
            "plain_step_times": plain_times,
        }
    return out


def _run_enclave(cfg: JobConfig, in_process: bool, mask_seed: bytes | None) -> dict[str, Any]:
    """The enclave's steps, each after its offline phase, timed apart; the released adapter."""
    ree = load_ree_model(cfg)
    server = FrozenLinearServer.from_model(ree.model)
    online: list[float] = []
    wall: list[float] = []
    preprocess: list[float] = []
    infos: list[dict[str, Any]] = []
    peak = 0
    with _enclave_for(cfg, in_process, mask_seed) as enclave:
        for step in range(cfg.train.max_steps):
            start = time.perf_counter()
            pre, _ = enclave.call("preprocess", {}, {}, server)
            preprocess.append(time.perf_counter() - start)
            start = time.perf_counter()
            info, _ = enclave.call("train_step", {"step": step}, {}, server)
            wall.append(time.perf_counter() - start)
            # A step that found the pool short preprocessed inline (the first step, which
            # learns which layers share a mask, always does): that part is offline work.
            inline = float(info.get("inline_preprocess_s", 0.0))
            online.append(wall[-1] - inline)
            preprocess[-1] += inline
            peak = max(
                peak, int(pre.get("pool_peak_bytes", 0)), int(info.get("pool_peak_bytes", 0))
            )
            infos.append(info)
        _, released = enclave.call("release", {}, {}, server)
    return {
        "steps": cfg.train.max_steps,
        "unblinding": cfg.enclave.unblinding,
        "enclave_step_s": statistics.median(online),
        "enclave_step_wall_s": statistics.median(wall),
        "enclave_step_times": online,
        "enclave_losses": [float(i["loss"]) for i in infos],
        "preprocess_s": statistics.median(preprocess),
        "preprocess_total_s": sum(preprocess),
        "preprocess_times": preprocess,
        "pool_mib": peak / 2**20,
        "pool_refills": sum(int(i.get("pool_refills", 0)) for i in infos),
        "unblind_s": statistics.median(float(i["unblind_s"]) for i in infos),
        "mask_s": statistics.median(float(i["mask_s"]) for i in infos),
        "ocall_s": statistics.median(float(i["ocall_s"]) for i in infos),
        "verify_s": statistics.median(float(i["verify_s"]) for i in infos),
        "ree_compute_s": server.compute_s / len(infos),
        "ocalls_per_step": statistics.median(int(i["ocalls"]) for i in infos),
        "bytes_to_ree_per_step": statistics.median(int(i["bytes_sent"]) for i in infos),
        "mask_std": cfg.enclave.mask_std,
        "enclave": "in-process" if in_process else "simulated",
        "released": released,
    }


def _adapter_gap(
    plain: dict[str, torch.Tensor], released: dict[str, torch.Tensor]
) -> dict[str, float]:
    """How far the enclave's adapter is from the plain trainer's (see compare_with_plain)."""
    if set(released) != set(plain):
        raise RuntimeError("the enclave released other adapter tensors than the plain run has")
    gaps = {name: (plain[name] - released[name]).abs() for name in plain}
    plain_norm = math.sqrt(sum(float(t.double().square().sum()) for t in plain.values()))
    gap_norm = math.sqrt(sum(float(g.double().square().sum()) for g in gaps.values()))
    return {
        "max_abs_diff": max(float(g.max()) for g in gaps.values()),
        "rel_diff": gap_norm / plain_norm if plain_norm > 0 else gap_norm,
        "elements_over_1e-5": sum(int((g > 1e-5).sum()) for g in gaps.values()),
        "elements": sum(g.numel() for g in gaps.values()),
    }


def _run_plain(cfg: JobConfig) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """The centralized trainer's steps, timed one by one (no evaluation, nothing written)."""
    job = build_job(cfg)
    optimizer = make_optimizer(job.model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    times, losses = [], []
    cuda = [job.device.index or 0] if job.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.train.seed)
        for step in range(cfg.train.max_steps):
            start = time.perf_counter()
            out = train_step(
                job.model, job.stream, step, optimizer, scheduler, cfg.train, job.device
            )
            if job.device.type == "cuda":
                torch.cuda.synchronize(job.device)
            times.append(time.perf_counter() - start)
            losses.append(out.loss)
    return times, losses, adapter_state(job.model)


@contextmanager
def _enclave_for(
    cfg: JobConfig, in_process: bool, mask_seed: bytes | None
) -> Iterator[EnclaveCalls]:
    if in_process:
        yield LocalEnclave(enclave_app_config(cfg), seed=mask_seed)
        return
    if mask_seed is not None:
        raise ValueError("mask_seed only applies in process; a real enclave draws its own key")
    with open_adapter_enclave(cfg) as enclave:
        yield enclave
