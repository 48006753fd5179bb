"""`silotune demo`: short end-to-end runs on embedded defaults, ending with a before/after table.

Three sections on the same model, data and test set: centralized LoRA (the reference), federated
LoRA with 3 simulated silos and homomorphic aggregation (`he`), and split learning with 2 silos
over gRPC + TLS + AEAD on loopback.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from silotune.config import JobConfig, config_from_dict
from silotune.dispatch import run_job
from silotune.errors import ConfigError
from silotune.eval.runner import evaluate_job
from silotune.train.run_folder import METRICS_FILE

DEMO_STEPS = 200
SECTIONS = ("centralized", "federated", "split")
# tiny-llama is a random 2.2M-parameter model: it shows every code path in seconds, and LoRA
# lifts it above chance on the 4-class sample, but it is not a good classifier.
BASE_JOB: dict[str, Any] = {
    "model": "tiny-llama",
    "adapter": {"type": "lora", "r": 8},
    "data": {"dataset": "fortunes-sample", "task": "classification"},
    "train": {"batch_size": 8, "lr": 5e-3, "seed": 0, "log_every": 10},
}
TITLES = {
    "centralized": "centralized",
    "federated": "federated (3 silos, he)",
    "split": "split (2 silos)",
}


def section_config(section: str, steps: int, output_dir: Path) -> JobConfig:
    """The embedded job of one demo section; each sees about `steps` x batch examples in all."""
    job: dict[str, Any] = {**BASE_JOB, "mode": section, "output_dir": str(output_dir)}
    overrides = [f"train.max_steps={steps}", f"train.eval_every={max(1, steps // 4)}"]
    if section == "federated":
        rounds = 4
        job["federation"] = {"silos": 3, "rounds": rounds, "secure_aggregation": "he"}
        overrides.append(f"federation.local_steps={max(1, steps // rounds)}")
    elif section == "split":
        job["split"] = {"silos": 2, "server_mode": "client-batching", "sync_every": 10}
        overrides.append(f"train.max_steps={max(1, steps // 2)}")
    return config_from_dict(job, overrides)


def _train_losses(run_dir: Path) -> list[float]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [r["loss"] for r in records if r.get("split") == "train" and "loss" in r]


def run_demo(
    steps: int | None,
    output_dir: Path | None,
    console: Console,
    overwrite: bool = False,
    sections: tuple[str, ...] = SECTIONS,
) -> dict[str, Any]:
    """Evaluate the untrained adapter, run each section, print one comparison table."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown demo section {unknown[0]!r} (allowed: {', '.join(SECTIONS)})")
    steps = steps or DEMO_STEPS
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="silotune-demo-") as tmp:
        root = output_dir or Path(tmp)
        base_cfg = section_config("centralized", steps, root / "centralized")
        results["untrained"] = {"test": evaluate_job(base_cfg, adapter_dir=None, split="test")}
        for section in sections:
            cfg = section_config(section, steps, root / section)
            console.rule(f"[bold]silotune demo: {TITLES[section]} (tiny-llama, fortunes-sample)")
            clock = time.perf_counter()
            summary = run_job(cfg, overwrite=overwrite, progress=True)
            losses = _train_losses(cfg.output_dir)
            results[section] = {
                "test": summary["test"],
                "seconds": time.perf_counter() - clock,
                "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None,
            }
    console.print(_table(results, sections))
    if output_dir is not None:
        console.print(f"runs kept in {output_dir} (adapters in <section>/adapter, PEFT format)")
    return results


def _table(results: dict[str, Any], sections: tuple[str, ...]) -> Table:
    table = Table(title="silotune demo: fortunes-sample test set, before and after training")
    table.add_column("metric")
    table.add_column("untrained", justify="right")
    for section in sections:
        table.add_column(TITLES[section], justify="right")
    before = results["untrained"]["test"]

    def cells(key: str) -> list[str]:
        return [f"{results[s]['test'][key]:.3f}" for s in sections]

    def loss(s: str) -> str:
        r = results[s]
        if r["first_loss"] is None:
            return "-"
        return f"{r['first_loss']:.2f} -> {r['last_loss']:.2f}"

    table.add_row("test accuracy", f"{before['accuracy']:.3f}", *cells("accuracy"))
    table.add_row("test macro-F1", f"{before['macro_f1']:.3f}", *cells("macro_f1"))
    table.add_row("train loss", "", *[loss(s) for s in sections])
    table.add_row("wall time (s)", "", *[f"{results[s]['seconds']:.0f}" for s in sections])
    return table
