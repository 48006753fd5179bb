"""`silotune bench federated`: federated vs centralized accuracy, and secure vs plain aggregation.

Same model, data, adapter and optimizer settings in every row. Federated rows run 3 silos on
Flower's simulation engine for `rounds` rounds of `local_steps` steps each; the centralized row
runs ``silos * rounds * local_steps`` steps, i.e. it sees as many training batches as all silos
together. Rows: centralized; federated with ``none``, ``masking`` and ``ckks`` aggregation, each on
an IID split and on a Dirichlet(0.5) label-skewed split; a control row adds N(0, 1e-9^2) noise to
every silo update of the plain Dirichlet run. Then the paired checks of
``silotune.bench.federated_paired``: how far each secure run's global adapter drifts from the plain
run's, round by round, and the plain run's last-round updates aggregated plain, masked and with HE.

Full: smollm2-135m on Debian fortunes (6 classes), LoRA r=8 on q,v, lr 2e-3, batch 8, 4 rounds of
10 local steps (120 silo-steps per row), evaluation capped at 200 examples per split (about 10-20
minutes per row on a 2-core CPU). Quick: the random tiny-llama on the bundled fortunes-sample (it
barely learns; the quick run checks the machinery in a few minutes).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from silotune.bench.federated_paired import divergence, paired_last_round, summarise
from silotune.config import JobConfig, config_from_dict
from silotune.dispatch import run_job

SILOS = 3
PARTITIONS = ("iid", "dirichlet")
SECURE = ("masking", "he")
CONTROL_PARTITION = "dirichlet"
CONTROL = f"federated {CONTROL_PARTITION} none + 1e-9 noise"
CONTROL_CLIP = 1e6  # far above any update norm (about 5-8 here): nothing is clipped
CONTROL_SIGMA = 1e-15  # noise std = sigma * clip = 1e-9


def base_job(quick: bool) -> dict[str, Any]:
    """Model, data and optimisation shared by every row."""
    if quick:
        return {
            "model": "tiny-llama",
            "adapter": {"type": "lora", "r": 8},
            "data": {"dataset": "fortunes-sample", "task": "classification"},
            "train": {"batch_size": 8, "lr": 5e-3, "seed": 0, "eval_batch_size": 32},
            "federation": {"rounds": 5, "local_steps": 10},
        }
    return {
        "model": "smollm2-135m",
        "adapter": {"type": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {
            "dataset": "fortunes",
            "task": "classification",
            "max_length": 128,
            "max_eval_examples": 200,
        },
        "train": {"batch_size": 8, "lr": 2e-3, "seed": 0, "eval_batch_size": 16},
        "federation": {"rounds": 4, "local_steps": 10},
    }


def rows(quick: bool) -> list[tuple[str, dict[str, Any]]]:
    """(name, job dict) of every row, centralized first."""
    base = base_job(quick)
    fed = base.pop("federation")
    steps = SILOS * fed["rounds"] * fed["local_steps"]
    out = [
        (
            "centralized",
            {
                **base,
                "mode": "centralized",
                "train": {**base["train"], "max_steps": steps, "eval_every": steps},
            },
        )
    ]
    federation = {**fed, "silos": SILOS, "min_silos": 2, "alpha": 0.5, "eval_every": fed["rounds"]}
    # every round's global adapter stays for the divergence table
    train = {**base["train"], "keep_checkpoints": fed["rounds"]}
    for partition in PARTITIONS:
        for secagg in ("none", *SECURE):
            f = {**federation, "partition": partition, "secure_aggregation": secagg}
            job = {**base, "mode": "federated", "federation": f, "train": train}
            out.append((f"federated {partition} {secagg}", job))
    # Control: plain FedAvg with N(0, 1e-9^2) added to every silo update (the DP path with no
    # effective clipping), a perturbation the size of masking's fixed-point step.
    f = {**federation, "partition": CONTROL_PARTITION, "secure_aggregation": "none"}
    f["dp"] = {"enabled": True, "clip_norm": CONTROL_CLIP, "noise_multiplier": CONTROL_SIGMA}
    out.append((CONTROL, {**base, "mode": "federated", "federation": f, "train": train}))
    return out


def run(quick: bool, console: Console) -> dict[str, Any]:
    """Train every row, run the paired checks, print the tables, return the JSON object."""
    results: dict[str, dict[str, float]] = {}
    configs: dict[str, JobConfig] = {}
    with tempfile.TemporaryDirectory(prefix="silotune-bench-fed-") as tmp:
        for name, job in rows(quick):
            console.log(f"federated bench: {name}")
            cfg = config_from_dict({**job, "output_dir": str(Path(tmp) / name.replace(" ", "-"))})
            configs[name] = cfg
            clock = time.perf_counter()
            summary = run_job(cfg, progress=False)
            results[name] = {
                "accuracy": summary["test"]["accuracy"],
                "macro_f1": summary["test"]["macro_f1"],
                "wall_s": time.perf_counter() - clock,
            }
        rounds = configs["federated iid none"].federation.rounds
        drift, paired = {}, {}
        for p in PARTITIONS:
            ref = configs[f"federated {p} none"]
            others = {m: configs[f"federated {p} {m}"].output_dir for m in SECURE}
            drift[p] = divergence(ref.output_dir, others, rounds)
            console.log(f"federated bench: paired last round, {p}")
            paired[p] = paired_last_round(ref)
    _print_runs(console, base_job(quick)["model"], results)
    _print_paired(console, drift, paired)
    return {
        "bench": "federated",
        "model": base_job(quick)["model"],
        "silos": SILOS,
        "results": results,
        "divergence": drift,
        "paired_last_round": paired,
    }


def _print_runs(console: Console, model: str, results: dict[str, dict[str, float]]) -> None:
    table = Table(title=f"bench federated: {model}, {SILOS} silos vs centralized")
    for col in ("run", "test accuracy", "macro-F1", "wall s"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, r in results.items():
        table.add_row(name, f"{r['accuracy']:.3f}", f"{r['macro_f1']:.3f}", f"{r['wall_s']:.0f}")
    console.print(table)
    gaps = {
        f"{p} {m}": 100
        * (results[f"federated {p} {m}"]["accuracy"] - results[f"federated {p} none"]["accuracy"])
        for p in PARTITIONS
        for m in SECURE
    }
    gaps[CONTROL.removeprefix("federated ")] = 100 * (
        results[CONTROL]["accuracy"] - results[f"federated {CONTROL_PARTITION} none"]["accuracy"]
    )
    console.print(
        "independent runs, accuracy points vs plain aggregation: "
        + ", ".join(f"{k} {v:+.1f}" for k, v in gaps.items())
    )


def _print_paired(
    console: Console,
    drift: dict[str, dict[str, list[dict[str, float]]]],
    paired: dict[str, dict[str, dict[str, float]]],
) -> None:
    table = Table(title="max |difference| of the global adapter from the plain run's, per round")
    table.add_column("run", justify="left")
    for r in drift[PARTITIONS[0]][SECURE[0]]:
        table.add_column(f"round {r['round']}", justify="right")
    for p in PARTITIONS:
        for m in SECURE:
            cells = [f"{r['max_abs']:.1e}" for r in drift[p][m]]
            table.add_row(f"{p} {m}", *cells)
    console.print(table)
    table = Table(title="last round's silo updates aggregated three ways (same updates)")
    for col in ("partition", "aggregation", "test accuracy", "points vs plain", "max |diff|"):
        table.add_column(col, justify="left" if col in ("partition", "aggregation") else "right")
    for p, by_method in paired.items():
        gaps = summarise(by_method)
        for m, r in by_method.items():
            gap = f"{gaps[m]:+.1f}" if m in gaps else ""
            table.add_row(p, m, f"{r['accuracy']:.3f}", gap, f"{r['max_abs_diff']:.1e}")
    console.print(table)
