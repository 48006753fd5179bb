"""`silotune bench enclave`: what the (simulated) enclave costs, and what SPF adds to LoRA.

Three comparisons, each against its baseline in the same run:

* ``split_plain`` vs ``split_enclave``: one split job (1 silo, h = t = 1, client-batching, gRPC +
  TLS + AEAD on loopback) with the trunk in the coordinator's process, then inside the simulated
  enclave (attested, the host relaying ciphertext). Step time is the silo's mean step after the
  first (warm-up) and before the last (final sync).
* ``adapter_plain`` vs ``adapter_enclave_online`` and ``adapter_enclave_offline``: the same LoRA
  training with the adapter in the REE and with the adapter in the enclave (frozen linear work on
  masked inputs in the REE), the unblinding factors computed in the step (online) or ahead of it
  (offline, Slalom's preprocessing). Step time is the online step; the offline row also reports
  its preprocessing seconds per step and the mask pool's size. Each enclave row reports the
  largest absolute difference between its trained adapter and the plain one.
* ``lora`` vs ``spf_lora``: test accuracy of LoRA alone and of SPF + LoRA after the same number of
  steps on Debian fortunes.

Full: smollm2-135m (SPF on fortunes, 6 classes, evaluation capped at 200 examples). Quick:
the random tiny-llama on the bundled fortunes-sample (timings and the adapter difference are
meaningful; its accuracies only show that both paths run).
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from silotune.bench.split import split_job
from silotune.config import config_from_dict

THREADS = 1  # one intra-op thread per process: see silotune.bench.split


def _model(quick: bool) -> str:
    return "tiny-llama" if quick else "smollm2-135m"


def _split_job(quick: bool, in_enclave: bool, out: Path) -> dict[str, Any]:
    job = split_job(quick, silos=1, mode="client-batching", batch=8, steps=5 if quick else 6)
    job["data"]["max_eval_examples"] = 8
    job["split"]["trunk_in_enclave"] = in_enclave
    return {**job, "output_dir": str(out)}


def _split_step_s(quick: bool, in_enclave: bool, tmp: Path) -> dict[str, float]:
    from silotune.split.runner import train_split
    from silotune.train.run_folder import SILOS_DIR

    out = tmp / ("split-enclave" if in_enclave else "split-plain")
    cfg = config_from_dict(_split_job(quick, in_enclave, out))
    train_split(cfg, progress=False)
    silo = json.loads((out / SILOS_DIR / "silo-0" / "summary.json").read_text("utf-8"))
    seconds = silo["step_seconds"]
    return {"step_s": statistics.mean(seconds[1:-1] or seconds)}


def _adapter_rows(quick: bool) -> dict[str, dict[str, float]]:
    from silotune.adapter_tee.runner import compare_unblinding

    job = {
        "mode": "centralized",
        "model": _model(quick),
        "adapter": {"type": "lora", "r": 8},
        "data": {"dataset": "fortunes-sample", "max_length": 64 if quick else 96},
        "train": {"batch_size": 4, "lr": 1e-3, "seed": 0, "max_grad_norm": None},
    }
    measured = compare_unblinding(job, steps=4 if quick else 3, modes=("online", "offline"))
    rows: dict[str, dict[str, float]] = {"adapter_plain": {"step_s": measured["plain"]["step_s"]}}
    for mode in ("online", "offline"):
        run = measured[mode]
        rows[f"adapter_enclave_{mode}"] = {
            "step_s": run["enclave_step_s"],
            "preprocess_s": run["preprocess_s"],
            "pool_mib": run["pool_mib"],
            "unblind_s": run["unblind_s"],
            "ocall_s": run["ocall_s"],
            "max_abs_diff": run["max_abs_diff"],
            "rel_diff": run["rel_diff"],
            "elements_over_1e-5": run["elements_over_1e-5"],
            "elements": run["elements"],
        }
    return rows


def _accuracy(quick: bool, spf: bool, tmp: Path) -> dict[str, float]:
    from silotune.dispatch import run_job

    steps = 30 if quick else 100
    job: dict[str, Any] = {
        "mode": "centralized",
        "model": _model(quick),
        # SPF's base-weight rows at a tenth of LoRA's lr: at the same lr they overshoot (docs/spf.md)
        "adapter": {
            "type": "lora",
            "r": 8,
            "spf": {"enabled": spf, "lr": 5e-4 if quick else 2e-4},
        },
        "data": (
            {"dataset": "fortunes-sample"}
            if quick
            else {"dataset": "fortunes", "max_length": 128, "max_eval_examples": 200}
        ),
        "train": {
            "max_steps": steps,
            "eval_every": steps,
            "batch_size": 8,
            "lr": 5e-3 if quick else 2e-3,
            "seed": 0,
            "eval_batch_size": 16,
            "threads": THREADS,
        },
        "output_dir": str(tmp / ("spf-lora" if spf else "lora")),
    }
    summary = run_job(config_from_dict(job), progress=False)
    return {"accuracy": summary["test"]["accuracy"], "macro_f1": summary["test"]["macro_f1"]}


def run(quick: bool, console: Console) -> dict[str, Any]:
    """Run every comparison, print the table, return the JSON object."""
    torch.set_num_threads(THREADS)
    model = _model(quick)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="silotune-bench-enclave-") as name:
        tmp = Path(name)
        for in_enclave in (False, True):
            key = "split_enclave" if in_enclave else "split_plain"
            console.log(f"enclave bench: {key} ({model})")
            results[key] = _split_step_s(quick, in_enclave, tmp)
        console.log(f"enclave bench: adapter in the REE vs in the enclave ({model})")
        results.update(_adapter_rows(quick))
        for spf in (False, True):
            key = "spf_lora" if spf else "lora"
            console.log(f"enclave bench: {key} accuracy ({model})")
            results[key] = _accuracy(quick, spf, tmp)

    table = Table(title=f"bench enclave: {model} (simulated enclave backend)")
    columns = ("run", "step s", "x baseline", "preprocess s", "pool MiB", "max abs diff")
    for column in (*columns, "test accuracy"):
        table.add_column(column, justify="left" if column == "run" else "right")
    baselines = {
        "split_enclave": "split_plain",
        "adapter_enclave_online": "adapter_plain",
        "adapter_enclave_offline": "adapter_plain",
    }
    for key, row in results.items():
        step = row.get("step_s")
        base = results[baselines[key]]["step_s"] if key in baselines else None
        table.add_row(
            key,
            f"{step:.3f}" if step is not None else "-",
            f"{step / base:.2f}" if step is not None and base else "-",
            f"{row['preprocess_s']:.3f}" if "preprocess_s" in row else "-",
            f"{row['pool_mib']:.1f}" if "pool_mib" in row else "-",
            f"{row['max_abs_diff']:.1e}" if "max_abs_diff" in row else "-",
            f"{row['accuracy']:.3f}" if "accuracy" in row else "-",
        )
    console.print(table)
    ratio = results["split_enclave"]["step_s"] / results["split_plain"]["step_s"]
    plain = results["adapter_plain"]["step_s"]
    offline = results["adapter_enclave_offline"]
    console.print(
        f"targets: enclave trunk <= 1.15x split step: {ratio:.2f}x; adapter-in-TEE online step "
        f"<= 2x plain: {offline['step_s'] / plain:.2f}x offline unblinding "
        f"({results['adapter_enclave_online']['step_s'] / plain:.2f}x online; preprocessing "
        f"{offline['preprocess_s']:.2f} s per step, pool {offline['pool_mib']:.0f} MiB); "
        f"adapter-in-TEE max abs diff <= 1e-5: {offline['max_abs_diff']:.1e} offline (relative "
        f"{offline['rel_diff']:.1e}; {offline['elements_over_1e-5']:.0f} of "
        f"{offline['elements']:.0f} elements over 1e-5), "
        f"{results['adapter_enclave_online']['max_abs_diff']:.1e} online"
    )
    return {"bench": "enclave", "model": model, "backend": "simulated", "results": results}
