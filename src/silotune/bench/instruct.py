"""`silotune bench instruct`: instruction tuning in every mode against the untuned model.

Rows, each on the same number of training examples (centralized: `steps` steps of `batch`;
federated: 3 silos x rounds x local steps = `steps`; split: 2 silos x `steps / 2` steps):
``untuned`` (the base model, evaluated only), ``centralized``, ``federated`` (pairwise masking,
``federation.partition: domain``, one dictionary per silo), ``federated_iid`` (masking, IID) and
``split`` (2 silos over gRPC + TLS + AEAD on loopback; the test evaluation runs on each silo's own
copy, docs/split.md). Scores on the test split: ROUGE-L and exact match of greedy answers,
multiple-choice accuracy (4 definitions, chance 0.25), response loss; plus wall time.

Full: smollm2-135m on the bundled dictionaries sample (300 training records, 60 test, 60 multiple
choice; the chat template), LoRA r=16 on q,k,v,o. Quick: the random tiny-llama on the same sample
(it checks the machinery; its answers are noise).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from silotune.config import JobConfig, config_from_dict
from silotune.dispatch import run_job
from silotune.eval.runner import evaluate_job

ROWS = ("untuned", "centralized", "federated", "federated_iid", "split")
FED_SILOS, FED_ROUNDS, SPLIT_SILOS = 3, 4, 2
METRICS = ("rouge_l", "exact_match", "mc_accuracy", "loss")


def base_job(quick: bool) -> tuple[dict[str, Any], int]:
    """The job every row shares and its centralized step count (a multiple of 12)."""
    data = {
        "dataset": "dictionaries-sample",
        "task": "instruction",
        "max_length": 320,
        "instruct": {"template": "auto", "max_response_length": 64},
    }
    if quick:
        job = {
            "model": "tiny-llama",
            "adapter": {"type": "lora", "r": 8},
            "data": {**data, "max_eval_examples": 12},
            "train": {"batch_size": 8, "lr": 3e-3, "seed": 0},
            "eval": {"max_new_tokens": 16, "generation_examples": 0},
        }
        return job, 24
    job = {
        "model": "smollm2-135m",
        "adapter": {
            "type": "lora",
            "r": 16,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        },
        "data": data,
        "train": {"batch_size": 8, "lr": 5e-4, "seed": 0, "eval_batch_size": 8},
        "eval": {"max_new_tokens": 48, "generation_examples": 0},
    }
    return job, 48


def row_config(row: str, quick: bool, out: Path) -> JobConfig:
    """The job of one row (``untuned`` is evaluated with the centralized row's settings)."""
    job, steps = base_job(quick)
    job = {**job, "output_dir": str(out / row)}
    train = {**job["train"], "max_steps": steps, "eval_every": steps, "log_every": 4}
    if row in ("untuned", "centralized"):
        return config_from_dict({**job, "mode": "centralized", "train": train})
    if row.startswith("federated"):
        federation = {
            "silos": FED_SILOS,
            "rounds": FED_ROUNDS,
            "local_steps": steps // (FED_SILOS * FED_ROUNDS),
            "secure_aggregation": "masking",
            "partition": "domain" if row == "federated" else "iid",
            "eval_every": FED_ROUNDS,
        }
        return config_from_dict(
            {**job, "mode": "federated", "train": train, "federation": federation}
        )
    split = {"silos": SPLIT_SILOS, "server_mode": "client-batching", "sync_every": 4}
    train = {**train, "max_steps": steps // SPLIT_SILOS, "eval_every": 10_000}
    return config_from_dict({**job, "mode": "split", "train": train, "split": split})


def examples_seen(cfg: JobConfig) -> int:
    """Training examples a row's job sees in all (every row's must be equal)."""
    batch = cfg.train.batch_size
    if cfg.mode == "federated":
        fed = cfg.federation
        return fed.silos * fed.rounds * fed.local_steps * batch
    if cfg.mode == "split":
        return cfg.split.silos * cfg.train.max_steps * batch
    return cfg.train.max_steps * batch


def run(quick: bool, console: Console) -> dict[str, Any]:
    """Evaluate the untuned model, train every mode, print a table and return the JSON."""
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="silotune-bench-instruct-") as tmp:
        for row in ROWS:
            cfg = row_config(row, quick, Path(tmp))
            console.print(f"bench instruct: {row} ({cfg.model.name})")
            clock = time.perf_counter()
            if row == "untuned":
                test = evaluate_job(cfg, adapter_dir=None, split="test", progress=False)
            else:
                test = run_job(cfg, progress=console.is_terminal)["test"]
            results[row] = {k: float(test[k]) for k in METRICS if k in test}
            results[row]["wall_s"] = time.perf_counter() - clock
            results[row]["examples_seen"] = 0 if row == "untuned" else examples_seen(cfg)
    _print_table(console, results, cfg.model.name)
    return {"bench": "instruct", "model": cfg.model.name, "quick": quick, "results": results}


def _print_table(console: Console, results: dict[str, dict[str, float]], model: str) -> None:
    table = Table(title=f"bench instruct: {model} on dictionaries-sample (test split)")
    for col in ("row", "examples", "ROUGE-L", "exact match", "MC accuracy", "loss", "wall s"):
        table.add_column(col, justify="left" if col == "row" else "right", no_wrap=True)
    for row, r in results.items():
        table.add_row(
            row,
            str(int(r["examples_seen"])),
            f"{r.get('rouge_l', float('nan')):.4f}",
            f"{r.get('exact_match', float('nan')):.4f}",
            f"{r.get('mc_accuracy', float('nan')):.4f}",
            f"{r.get('loss', float('nan')):.4f}",
            f"{r['wall_s']:.1f}",
        )
    console.print(table)
