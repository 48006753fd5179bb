"""`silotune bench split`: split training (gRPC + TLS + AEAD on loopback) against centralized.

Same model, data and total batch per step for every variant: ``centralized`` (one process),
``split_1`` (one silo with the whole batch), and four silos with a quarter each in the three server
modes. Every silo and the centralized baseline run in their own spawned process, so their peak
RSS (``VmHWM``) is their own; the coordinator runs in this process. Every process uses one
intra-op thread (see ``THREADS``). Step times are means over the steps
after the first (warm-up) and before the last (which holds the final adapter sync).
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from silotune.config import JobConfig, config_from_dict

# One intra-op thread per process for every variant: on a shared 2-core machine, two OpenMP
# threads per process under contention made steps up to 10x slower and the timings meaningless.
THREADS = 1

MODES = {
    "split_1": (1, "client-batching"),
    "split_4_sequential": (4, "sequential"),
    "split_4_batching": (4, "client-batching"),
    "split_4_hierarchical": (4, "server-hierarchical"),
}


def split_job(quick: bool, silos: int, mode: str, batch: int, steps: int) -> dict[str, Any]:
    """The split job the split benchmarks time (as a dict, for callers that add keys)."""
    return {
        "mode": "split",
        "model": "tiny-llama" if quick else "smollm2-135m",
        "adapter": {"type": "lora", "r": 8},
        "data": {"dataset": "fortunes-sample", "max_length": 64 if quick else 128},
        "train": {
            "max_steps": steps,
            "batch_size": batch,
            "lr": 1e-3,
            "eval_every": 10_000,
            "log_every": 10_000,
            "threads": THREADS,
        },
        "split": {
            "head_layers": 1,
            "tail_layers": 1,
            "silos": silos,
            "server_mode": mode,
            "sync_every": steps,
            "timeout_s": 600,
        },
    }


def _config(quick: bool, silos: int, mode: str, batch: int, steps: int) -> JobConfig:
    return config_from_dict(split_job(quick, silos, mode, batch, steps))


def _steady(step_seconds: list[float]) -> float:
    """Mean step time without the warm-up step and the final-sync step."""
    inner = step_seconds[1:-1] or step_seconds
    return statistics.mean(inner)


def _centralized_worker(cfg_data: dict[str, Any], out: str) -> None:
    """Spawned: centralized train steps on the same job; writes step times and peak RSS."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from silotune.split.runner import peak_rss_mb
    from silotune.train.job import build_job
    from silotune.train.loop import make_optimizer, make_scheduler, train_step

    torch.set_num_threads(THREADS)

    cfg = config_from_dict({**cfg_data, "mode": "centralized"})
    job = build_job(cfg)
    optimizer = make_optimizer(job.model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    times = []
    for step in range(cfg.train.max_steps):
        start = time.perf_counter()
        train_step(job.model, job.stream, step, optimizer, scheduler, cfg.train, job.device)
        times.append(time.perf_counter() - start)
    Path(out).write_text(json.dumps({"step_seconds": times, "peak_rss_mb": peak_rss_mb()}), "utf-8")


def _run_centralized(cfg: JobConfig, tmp: Path) -> dict[str, Any]:
    out = tmp / "centralized.json"
    context = multiprocessing.get_context("spawn")
    process = context.Process(
        target=_centralized_worker, args=(cfg.model_dump(mode="json"), str(out))
    )
    process.start()
    process.join()
    if process.exitcode != 0 or not out.is_file():
        raise RuntimeError("the centralized baseline process failed")
    data = json.loads(out.read_text("utf-8"))
    step_s = _steady(data["step_seconds"])
    batch = cfg.train.batch_size
    return {"step_s": step_s, "samples_per_s": batch / step_s, "peak_rss_mb": data["peak_rss_mb"]}


def _run_split(cfg: JobConfig, tmp: Path, total_batch: int) -> dict[str, Any]:
    from silotune.split.keys import load_coordinator_keys, write_job_keys
    from silotune.split.runner import _silo_process, build_service, silo_names
    from silotune.transport.grpc_stream import GrpcStreamServer
    from silotune.transport.tls import generate_tls_material, load_tls_material

    names = silo_names(cfg.split.silos)
    keys, tls = tmp / "keys", tmp / "tls"
    write_job_keys(keys, names)
    generate_tls_material(tls, hosts=["127.0.0.1"])
    cfg = cfg.model_copy(deep=True)
    cfg.split.keys_dir, cfg.split.tls_dir = keys, tls
    service = build_service(cfg, *load_coordinator_keys(keys))
    server = GrpcStreamServer(service.handle, "127.0.0.1:0", tls=load_tls_material(tls))
    server.start()
    threads = THREADS
    context = multiprocessing.get_context("spawn")
    processes = []
    try:
        for index, name in enumerate(names):
            args = (
                cfg.model_dump(mode="json"),
                name,
                index,
                server.target,
                str(tmp / name),
                False,
                threads,
            )
            process = context.Process(target=_silo_process, args=args, daemon=True)
            process.start()
            processes.append(process)
        for process in processes:
            process.join()
    finally:
        server.stop(0.5)
    summaries = []
    for name, process in zip(names, processes, strict=True):
        path = tmp / name / "summary.json"
        if process.exitcode != 0 or not path.is_file():
            error = tmp / name / "error.txt"
            reason = error.read_text("utf-8") if error.is_file() else f"exit {process.exitcode}"
            raise RuntimeError(f"silo {name} failed: {reason.strip().splitlines()[-1]}")
        summaries.append(json.loads(path.read_text("utf-8")))
    step_s = max(_steady(s["step_seconds"]) for s in summaries)
    return {
        "step_s": step_s,
        "samples_per_s": total_batch / step_s,
        "bytes_per_step": sum(s["wire_bytes_per_step"] for s in summaries),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in summaries),
    }


def run(quick: bool, console: Console) -> dict[str, Any]:
    """Run every variant, print the table, return the JSON result."""
    torch.set_num_threads(THREADS)  # the coordinator runs in this process
    total_batch, steps = 8, (4 if quick else 6)
    model = "tiny-llama" if quick else "smollm2-135m"
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="silotune-bench-split-") as tmp_name:
        tmp = Path(tmp_name)
        console.print(
            f"[bold]split bench[/bold]: {model}, total batch {total_batch}, {steps} steps"
        )
        results["centralized"] = _run_centralized(
            _config(quick, 1, "client-batching", total_batch, steps), tmp
        )
        for key, (silos, mode) in MODES.items():
            console.print(f"running {key} ...")
            cfg = _config(quick, silos, mode, total_batch // silos, steps)
            (tmp / key).mkdir()
            results[key] = _run_split(cfg, tmp / key, total_batch)

    base = results["centralized"]
    table = Table(title=f"split vs centralized ({model}, h = t = 1, total batch {total_batch})")
    for column in (
        "variant",
        "step s",
        "samples/s",
        "x centr. step",
        "wire MiB/step",
        "peak RSS MiB",
    ):
        table.add_column(column, justify="right")
    for key, r in results.items():
        wire = f"{r['bytes_per_step'] / 2**20:.2f}" if "bytes_per_step" in r else "-"
        table.add_row(
            key,
            f"{r['step_s']:.3f}",
            f"{r['samples_per_s']:.1f}",
            f"{r['step_s'] / base['step_s']:.2f}",
            wire,
            f"{r['peak_rss_mb']:.0f}",
        )
    console.print(table)
    split4 = results["split_4_batching"]
    targets = {
        "split_1_step_vs_centralized": results["split_1"]["step_s"] / base["step_s"],
        "batching_samples_vs_centralized": split4["samples_per_s"] / base["samples_per_s"],
        "batching_vs_sequential": split4["samples_per_s"]
        / results["split_4_sequential"]["samples_per_s"],
        "silo_rss_vs_centralized": results["split_1"]["peak_rss_mb"] / base["peak_rss_mb"],
    }
    console.print(
        "targets: split_1 step <= 1.10x centralized: {:.2f}x; batching samples/s >= 0.9x "
        "centralized: {:.2f}x and >= 1.5x sequential: {:.2f}x; silo RSS <= 40% of centralized: "
        "{:.0%}".format(*targets.values())
    )
    return {"bench": "split", "model": model, "results": results, "ratios": targets}
