"""Run split training: a silo's loop, the coordinator's trunk service, and both wired over gRPC + TLS.

* :func:`run_silo` trains one silo (head and tail) against a trunk server; ``silotune join``.
* :func:`build_service` / :func:`serve` run the coordinator's trunk server; ``silotune serve``.
* :func:`train_split` runs a whole job on one machine (``silotune train`` with ``mode: split``):
  throwaway identity keys and TLS certificates, the coordinator in this process, each silo in its
  own spawned process, all over gRPC + TLS on loopback; then the usual ``metrics.jsonl``,
  ``summary.json`` and a complete PEFT adapter in ``output_dir/adapter``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import resource
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from silotune.config import JobConfig, dump_config
from silotune.crypto.identity import IdentityKey
from silotune.data.instruct import InstructionTask
from silotune.data.partition import partition_iid
from silotune.data.registry import DatasetSplits, load_splits, task_for
from silotune.data.tasks import ClassificationTask
from silotune.enclave.platform import load_platform_key
from silotune.errors import ConfigError, CryptoError, FrameError, SilotuneError, TransportError
from silotune.split.agreement import settings_digest, shared_settings
from silotune.split.enclave_trunk import EnclaveTrunk
from silotune.split.engines import Roster, make_engine
from silotune.split.keys import (
    load_coordinator_keys,
    load_enrollment,
    load_silo_identity,
    load_silo_keys,
    write_job_keys,
)
from silotune.split.leakage_notice import leakage_notice
from silotune.split.parts import (
    ModelHalf,
    PartState,
    build_half,
    check_split_config,
    save_full_adapter,
)
from silotune.split.resume import TrunkCheckpoints, restore_silo, restore_trunk, save_silo
from silotune.split.session import FrameSession, SplitError, open_session
from silotune.split.silo import SplitSilo, TrunkLink, make_averager
from silotune.split.silo_eval import (
    local_test_scores,
    scored_locally,
    split_test_scores,
    validation_scores,
)
from silotune.split.spf_parts import spf_rows_state
from silotune.split.trunk import Trunk, TrunkService
from silotune.train.loop import BatchStream, make_optimizer, make_scheduler, train_step
from silotune.train.run_folder import (
    ADAPTER_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    SILOS_DIR,
    SUMMARY_FILE,
    MetricsLog,
    prepare_output_dir,
    train_record,
    write_summary,
)
from silotune.train.schedule import Schedule
from silotune.train.threads import apply_threads, threads_per_process
from silotune.transport.grpc_stream import GrpcStreamServer, connect
from silotune.transport.tls import generate_tls_material, load_tls_material

__all__ = ["build_service", "join", "run_silo", "serve", "train_split"]

log = logging.getLogger(__name__)

REJOIN_HINT = (
    "if the coordinator still runs (or was restarted with --resume), join again with --resume "
    "to continue from this silo's last checkpoint"
)


# --------------------------------------------------------------------------- silo


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    Reads ``VmHWM`` from ``/proc/self/status``: ``ru_maxrss`` survives ``exec`` on Linux, so a
    spawned process would report its parent's size at fork time.
    """
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_silo(
    cfg: JobConfig,
    silo_name: str,
    out_dir: Path,
    *,
    target: str | None = None,
    shard: int | None = None,
    evaluate_splits: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Train one silo against the trunk server at ``target`` (default ``split.address``).

    Parameters
    ----------
    cfg
        The job; ``split.keys_dir`` must hold ``<silo_name>.key`` and ``coordinator.pub``,
        ``split.tls_dir`` the CA certificate ``ca.pem``.
    silo_name
        This silo's enrolled name.
    out_dir
        Where this silo writes ``metrics.jsonl``, ``summary.json`` and ``adapter/``.
    shard
        Train on IID part ``shard`` of ``split.silos`` parts of the training split (simulation);
        ``None`` trains on all of it (a real silo's own data).
    evaluate_splits
        Evaluate on validation every ``train.eval_every`` steps and on test at the end.
    resume
        Continue from the newest checkpoint in ``out_dir`` (written at every sync step).

    Returns
    -------
    dict
        The silo's summary (also written to ``out_dir/summary.json``).
    """
    check_split_config(cfg)
    t, s = cfg.train, cfg.split
    if s.trunk_in_enclave:
        from silotune.split.attest import attest_trunk, trunk_policy

        identity, policy = load_silo_identity(s.keys_dir, silo_name), trunk_policy(cfg)
    else:
        identity, coordinator = load_silo_keys(s.keys_dir, silo_name)
    # Peers' public identities: every key of a secure-averaging round must be signed by one.
    enrollment = None
    if s.secure_averaging == "masking":
        enrollment = load_enrollment(s.keys_dir, f"silo {silo_name!r} (secure averaging)")
    if s.tls_dir is None:
        raise ConfigError("split.tls_dir is not set; a silo needs the CA certificate ca.pem")
    tls = load_tls_material(s.tls_dir, role="client")
    half = build_half(cfg, "silo")
    splits = load_splits(cfg.data, seed=t.seed)
    tokenizer = half.loaded.tokenizer
    task = task_for(tokenizer, cfg.data, splits)
    train = splits.train
    if shard is not None:
        if not 0 <= shard < s.silos:
            raise ConfigError(f"shard {shard} is out of range 0..{s.silos - 1} (split.silos)")
        train = [train[i] for i in partition_iid(len(train), s.silos, t.seed)[shard]]
    stream = BatchStream(
        [task.encode(ex) for ex in train], t.batch_size, t.seed, tokenizer.pad_token_id
    )
    device = half.loaded.device

    connection = connect(target or s.address, tls=tls, client_id=silo_name, timeout=s.timeout_s)
    if s.trunk_in_enclave:  # the coordinator key is the enclave's, taken from a verified quote
        coordinator = attest_trunk(connection, policy, s.timeout_s)
        log.info("Attested the coordinator's simulated enclave; keying the channel to it.")
    session = open_session(connection, identity, coordinator, timeout=s.timeout_s)
    try:
        averaging = (identity, enrollment, silo_name)
        return _train_silo(
            cfg, half, session, stream, task, splits, device, out_dir, evaluate_splits, averaging,
            resume=resume,
        )  # fmt: skip
    except (TransportError, CryptoError, FrameError) as exc:  # one line, with what to do
        reason = session.last_words() or str(exc)
        raise SplitError(
            f"the session with the coordinator ended: {reason}; {REJOIN_HINT}"
        ) from None
    finally:
        session.close()


def _train_silo(
    cfg: JobConfig,
    half: ModelHalf,
    session: FrameSession,
    stream: BatchStream,
    task: ClassificationTask | InstructionTask,
    splits: DatasetSplits,
    device: torch.device,
    out_dir: Path,
    evaluate_splits: bool,
    averaging: tuple[Any, Any, str],
    resume: bool = False,
) -> dict[str, Any]:
    """The silo's training loop over an open session (see :func:`run_silo`).

    ``averaging`` is (identity key, enrollment, silo name) for secure averaging; ``resume``
    continues from the newest checkpoint in ``out_dir``.
    """
    t, s = cfg.train, cfg.split
    link = TrunkLink(
        session, t.grad_accum, s.activation_dtype, s.noise_sigma, t.seed, timeout=s.timeout_s
    )
    model = SplitSilo(half.parts.head, half.parts.tail, link).to(device)
    names = PartState(half.model, [half.parts.head, half.parts.tail])
    averager = make_averager(cfg, link, *averaging)
    examples = len(stream.examples)
    settings = shared_settings(cfg, half.model)
    link.join(examples, settings)  # refused here, before any step, if the settings differ
    optimizer = make_optimizer(model, t)
    optimizer.register_step_pre_hook(link.commit)
    scheduler = make_scheduler(optimizer, t)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    history = getattr(averager, "history", None)  # secure-averaging rounds taken part in
    if resume:
        start = restore_silo(out_dir, half.model, optimizer, scheduler, t.max_steps, history)
        link.step = start  # commit frames carry the silo's step
    metrics = MetricsLog(out_dir / METRICS_FILE, keep_until_step=start if resume else None)
    schedule = Schedule.steps(cfg)
    clock = time.perf_counter()
    step_seconds: list[float] = []
    train_bytes = 0
    for step in range(start, t.max_steps):
        bytes_before, started = session.stats.total_bytes, time.perf_counter()
        out = train_step(model, stream, step, optimizer, scheduler, t, device, loss_fn=model.loss)
        done = step + 1
        if schedule.syncs(done):
            parts = [half.parts.head, half.parts.tail]
            names.set(parts, averager.average(done, names.get(parts), examples))
        step_seconds.append(time.perf_counter() - started)
        train_bytes += session.stats.total_bytes - bytes_before
        if schedule.logs(done):
            wire_bytes = session.stats.total_bytes - bytes_before
            metrics.write(
                train_record(done, out, time.perf_counter() - clock, wire_bytes=wire_bytes)
            )
        if evaluate_splits and schedule.evaluates(done):
            scores = validation_scores(cfg, model, task, splits, device)
            metrics.write({"step": done, "split": "validation", **scores})
        if schedule.syncs(done):  # after its records, so a resumed run keeps them
            save_silo(out_dir, done, half.model, optimizer, scheduler, cfg, averaging[2], history)
    train_s = time.perf_counter() - clock
    log.info("Silo finished %d steps in %.1f s.", t.max_steps, train_s)
    test = {}
    if evaluate_splits and not scored_locally(task):
        test = split_test_scores(cfg, model, task, splits, device)
    trunk_state = link.finish()
    state = names.get([half.parts.head, half.parts.tail])
    state.update(trunk_state)
    save_full_adapter(half.model, state, out_dir / ADAPTER_DIR)
    if evaluate_splits and scored_locally(task):  # the whole model is the silo's now
        test = local_test_scores(cfg, task, splits, out_dir / ADAPTER_DIR)
    if test:
        metrics.write({"step": t.max_steps, "split": "test", **test})
    summary = write_summary(
        cfg,
        train_s,
        test,
        out_dir=out_dir,
        examples=examples,
        wire_bytes=session.stats.total_bytes,
        wire_bytes_per_step=train_bytes / max(1, t.max_steps - start),  # sealed, both ways
        settings_digest=settings_digest(settings),
        step_seconds=step_seconds,
        peak_rss_mb=peak_rss_mb(),
    )
    return summary


# --------------------------------------------------------------------------- coordinator


def build_service(
    cfg: JobConfig,
    identity: Any,
    enrollment: Any,
    *,
    checkpoints: bool = False,
    resume: bool = False,
) -> TrunkService:
    """The coordinator's trunk (in ``split.server_mode``) behind a :class:`TrunkService`.

    ``checkpoints`` writes the trunk's checkpoints to ``output_dir``; ``resume`` first restores
    the newest one (:mod:`~silotune.split.resume`).
    """
    half = build_half(cfg, "trunk")
    trunk = half.parts.trunk
    param = next(trunk.parameters())
    engine = make_engine(
        cfg.split.server_mode,
        trunk,
        PartState(half.model, [trunk]),
        cfg.train,
        Roster(cfg.split.timeout_s),
        param.device,
        param.dtype,
    )
    max_tokens = int(getattr(half.model.config, "max_position_embeddings", 0) or 0)
    max_tokens = max_tokens or int(getattr(half.model.config, "n_positions", 4096))
    dtype = None if cfg.split.activation_dtype == "float32" else cfg.split.activation_dtype
    saver = TrunkCheckpoints(cfg.output_dir, engine, half.model, cfg) if checkpoints else None
    if resume and saver is not None:
        saver.saved = restore_trunk(cfg.output_dir, engine, half.model)
    return TrunkService(
        engine,
        identity,
        enrollment,
        half.hidden_size,
        max_tokens,
        cfg.split.silos,
        shared_settings(cfg, half.model),
        dtype,
        averaging=cfg.split.secure_averaging,
        checkpoints=saver,
        spf_rows=spf_rows_state(half.model, [trunk]),
    )


def serve(cfg: JobConfig, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run the trunk server at ``split.address`` until every silo has said goodbye.

    The trunk is checkpointed at the silos' sync steps; ``resume`` continues from the newest.
    """
    check_split_config(cfg)
    if resume and cfg.split.trunk_in_enclave:
        raise ConfigError(
            "--resume is not available with split.trunk_in_enclave (the enclave's state is sealed "
            "to its run); start the job again"
        )
    log.warning("%s", leakage_notice(cfg))
    if cfg.split.trunk_in_enclave:  # the enclave makes its own identity; the host needs none
        enrollment = load_enrollment(cfg.split.keys_dir)
    else:
        identity, enrollment = load_coordinator_keys(cfg.split.keys_dir)
    if cfg.split.tls_dir is None:
        raise ConfigError(
            "split.tls_dir is not set; the coordinator needs ca.pem, server.pem, server.key"
        )
    tls = load_tls_material(cfg.split.tls_dir, role="server")
    prepare_output_dir(cfg, resume=resume, overwrite=overwrite)
    service: Trunk
    if cfg.split.trunk_in_enclave:  # the enclave's process and this one share the machine
        threads = threads_per_process(cfg, 2)
        apply_threads(threads)
        platform_key = load_platform_key(cfg.enclave.platform_key)
        service = _start_enclave(cfg, enrollment, platform_key, threads)
    else:
        apply_threads(threads_per_process(cfg))
        service = build_service(cfg, identity, enrollment, checkpoints=True, resume=resume)
    server = GrpcStreamServer(
        service.handle, cfg.split.address, tls=tls, max_connections=cfg.split.silos + 8
    )
    server.start()
    log.info(
        "Trunk server (%s) on %s; waiting for %d silo(s) of %s.",
        cfg.split.server_mode,
        cfg.split.address,
        cfg.split.silos,
        ", ".join(enrollment.names()),
    )
    if isinstance(service, TrunkService):  # an enclave's settings are in its measurement
        log.info("Silos must join with the same split settings (digest %s).", service.digest[:16])
    clock = time.perf_counter()
    try:
        service.finished.wait()
        service.check()
        return _coordinator_summary(cfg, service, time.perf_counter() - clock)
    finally:
        server.stop(grace=1.0)
        service.close()


def _coordinator_summary(cfg: JobConfig, service: Trunk, seconds: float) -> dict[str, Any]:
    out = cfg.output_dir
    return write_summary(
        cfg,
        None,
        None,
        role="coordinator",
        server_mode=cfg.split.server_mode,
        seconds=seconds,
        trunk_steps=service.commits,
        sessions=[vars(r) for r in service.records],
        **service.save(out, cfg),
    )


def _start_enclave(
    cfg: JobConfig, enrollment: Any, platform_key: Any, threads: int | None = None
) -> EnclaveTrunk:
    trunk = EnclaveTrunk.start(cfg, enrollment, platform_key, threads=threads)
    log.info(
        "Trunk runs in a SIMULATED enclave (measurement %s); this host relays only ciphertext.",
        trunk.measurement.hex(),
    )
    return trunk


def _silo_process(
    cfg_data: dict[str, Any],
    name: str,
    shard: int,
    target: str,
    out_dir: str,
    evaluate_splits: bool,
    threads: int,
    resume: bool = False,
) -> None:
    """Entry point of a spawned silo process; failures go to ``out_dir/error.txt``."""
    import warnings

    from silotune.config import config_from_dict

    warnings.filterwarnings("ignore", category=FutureWarning)
    apply_threads(threads)
    out = Path(out_dir)
    try:
        cfg = config_from_dict(cfg_data)
        run_silo(
            cfg, name, out, target=target, shard=shard, evaluate_splits=evaluate_splits,
            resume=resume,
        )  # fmt: skip
    except BaseException as exc:
        out.mkdir(parents=True, exist_ok=True)
        message = str(exc) if isinstance(exc, SilotuneError) else traceback.format_exc()
        (out / "error.txt").write_text(message, encoding="utf-8")
        raise SystemExit(1) from None


def silo_names(count: int) -> list[str]:
    """Names of the silos a one-machine job enrolls."""
    return [f"silo-{i}" for i in range(count)]


def train_split(
    cfg: JobConfig, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run a split job on this machine: coordinator here, one process per silo, gRPC + TLS."""
    check_split_config(cfg)
    log.warning("%s", leakage_notice(cfg))
    if resume and cfg.split.trunk_in_enclave:
        raise ConfigError(
            "--resume is not available with split.trunk_in_enclave (the enclave's state is sealed "
            "to its run); start the run again"
        )
    prepare_output_dir(cfg, resume=resume, overwrite=overwrite)
    out = cfg.output_dir
    if not resume:  # no silo may later resume from an older run's checkpoints
        shutil.rmtree(out / SILOS_DIR, ignore_errors=True)
    names = silo_names(cfg.split.silos)
    threads = threads_per_process(cfg, cfg.split.silos + 1)  # coordinator + one per silo
    apply_threads(threads)
    with tempfile.TemporaryDirectory(prefix="silotune-split-") as tmp:
        keys_dir, tls_dir = Path(tmp) / "keys", Path(tmp) / "tls"
        write_job_keys(keys_dir, names)
        generate_tls_material(tls_dir, hosts=["127.0.0.1", "localhost"])
        local = cfg.model_copy(deep=True)
        local.split.keys_dir, local.split.tls_dir = keys_dir, tls_dir
        identity, enrollment = load_coordinator_keys(keys_dir)
        service: Trunk
        if cfg.split.trunk_in_enclave:  # a throwaway platform; silos get its public key
            platform = IdentityKey.generate()
            platform.public.save(Path(tmp) / "platform.pub")
            local.enclave.platform_key = Path(tmp) / "platform.pub"
            service = _start_enclave(local, enrollment, platform, threads)
        else:
            service = build_service(local, identity, enrollment, checkpoints=True, resume=resume)
        server = GrpcStreamServer(
            service.handle, "127.0.0.1:0", tls=load_tls_material(tls_dir), max_connections=64
        )
        server.start()
        context = multiprocessing.get_context("spawn")
        data = local.model_dump(mode="json")
        processes = []
        clock = time.perf_counter()
        try:
            for index, name in enumerate(names):
                args = (
                    data,
                    name,
                    index,
                    server.target,
                    str(out / SILOS_DIR / name),
                    index == 0,
                    threads,
                    resume,
                )
                process = context.Process(target=_silo_process, args=args, name=name, daemon=True)
                process.start()
                processes.append(process)
            _wait(processes, service, cfg, progress)
            service.check()
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                    process.join(5)
            server.stop(grace=1.0)
            service.close()
        seconds = time.perf_counter() - clock
    return _merge_outputs(cfg, names, processes, service, seconds)


def _wait(processes: list[Any], service: Trunk, cfg: JobConfig, progress: bool) -> None:
    total = cfg.train.max_steps * len(processes)
    with Progress(
        TextColumn("[bold]split"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not progress,
    ) as bar:
        task = bar.add_task("silo steps", total=total)
        while any(p.is_alive() for p in processes):
            bar.update(task, completed=sum(r.steps for r in service.records))
            for p in processes:
                p.join(0.2)
        bar.update(task, completed=sum(r.steps for r in service.records))


def _merge_outputs(
    cfg: JobConfig, names: list[str], processes: list[Any], service: Trunk, seconds: float
) -> dict[str, Any]:
    out = cfg.output_dir
    failed = {}
    for name, process in zip(names, processes, strict=True):
        if process.exitcode != 0:
            error = out / SILOS_DIR / name / "error.txt"
            failed[name] = (
                error.read_text(encoding="utf-8")
                if error.is_file()
                else (f"exit code {process.exitcode}")
            )
    first = out / SILOS_DIR / names[0]
    if names[0] in failed or not (first / SUMMARY_FILE).is_file():
        reason = failed.get(names[0], "it wrote no summary").strip().splitlines()[-1]
        raise SplitError(f"split training failed: silo {names[0]} did not finish ({reason})")
    for name, reason in failed.items():
        log.warning("Silo %s failed: %s", name, reason.strip().splitlines()[-1])
    lines = []
    for name in names:
        path = out / SILOS_DIR / name / METRICS_FILE
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                lines.append({**json.loads(line), "silo": name})
    lines.sort(key=lambda r: (r["step"], r["split"] == "test", r["silo"]))
    (out / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines), "utf-8")
    shutil.copytree(first / ADAPTER_DIR, out / ADAPTER_DIR, dirs_exist_ok=True)
    silo0 = json.loads((first / SUMMARY_FILE).read_text(encoding="utf-8"))
    split = {
        "server_mode": cfg.split.server_mode,
        "silos": len(names),
        "failed_silos": sorted(failed),
        "wire_bytes_per_step_silo0": silo0["wire_bytes_per_step"],
        "trunk_steps": service.commits,
        "sessions": [vars(r) for r in service.records],
        **service.describe(),
    }
    summary = write_summary(cfg, seconds, silo0["test"], split=split)
    (out / CONFIG_FILE).write_text(dump_config(cfg), encoding="utf-8")
    return summary


def join(
    cfg: JobConfig,
    silo_name: str,
    shard: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """``silotune join``: train this silo against ``split.address``; outputs in ``output_dir``.

    ``resume`` continues from this silo's newest checkpoint (its last synced adapter).
    """
    check_split_config(cfg)
    log.warning("%s", leakage_notice(cfg))
    prepare_output_dir(cfg, resume=resume, overwrite=overwrite)
    apply_threads(threads_per_process(cfg))
    return run_silo(cfg, silo_name, cfg.output_dir, shard=shard, resume=resume)
