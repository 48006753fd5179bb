"""`silotune bench eval`: one-pass label scoring against the per-label path, same model, same run.

Full: smollm2-135m with a LoRA adapter (r 8 on q, v, moved off its zero initialisation so it takes
part) on the 526 test examples of Debian fortunes (6 labels), max length 160, 16 sequences per
forward. Quick: tiny-llama on the bundled fortunes-sample (4 labels). Both paths score every label
of every example; the table gives their time, the largest difference between their
log-likelihoods, and their accuracy and macro-F1 (which must agree). The two paths alternate over
chunks of 64 examples, so that other load on the machine weighs on both alike.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from silotune.bench import finetune
from silotune.config import config_from_dict
from silotune.eval.evaluate import label_scores
from silotune.eval.metrics import accuracy, macro_f1
from silotune.eval.one_pass import pack_rows
from silotune.train.job import build_job

CHUNK = 64  # examples per alternation of the two paths


def job_dict(quick: bool, output_dir: Path) -> dict[str, Any]:
    """The model, adapter and data both paths score: ``bench finetune``'s."""
    job = finetune.job_dict(quick, output_dir)
    job["train"] = {"eval_batch_size": 16}
    return job


def _perturb_adapter(model: torch.nn.Module) -> None:
    """Move the trainable tensors off their initialisation (LoRA's B is zero)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.01)


def run(quick: bool, console: Console) -> dict[str, Any]:
    """Score the test split both ways; print a table and return the JSON result."""
    with tempfile.TemporaryDirectory(prefix="silotune-bench-") as tmp:
        cfg = config_from_dict(job_dict(quick, Path(tmp) / "run"))
        job = build_job(cfg)
    _perturb_adapter(job.model)
    task, examples, size = job.task, job.splits.test, cfg.train.eval_batch_size
    golds = [ex["label"] for ex in examples]
    prompts = [task.prompt_ids(ex["text"]) for ex in examples]
    rows = pack_rows(prompts, task.label_ids, task.max_length)
    candidates = [c for ex in examples for c in task.candidates(ex)]
    tokens = {
        "per_label": sum(len(c.input_ids) for c in candidates),
        "one_pass": sum(len(r.input_ids) for r in rows),
    }
    sequences = {"per_label": len(candidates), "one_pass": len(rows)}
    # The two paths alternate over chunks of the test set, so that load from other processes on
    # a shared machine slows both alike.
    seconds = {"per_label": 0.0, "one_pass": 0.0}
    parts: dict[str, list[torch.Tensor]] = {"per_label": [], "one_pass": []}
    for start in range(0, len(examples), CHUNK):
        chunk = examples[start : start + CHUNK]
        for name in parts:
            clock = time.perf_counter()
            parts[name].append(
                label_scores(job.model, task, chunk, size, job.device, one_pass=name == "one_pass")
            )
            seconds[name] += time.perf_counter() - clock
    results: dict[str, dict[str, Any]] = {}
    scores = {name: torch.cat(chunks) for name, chunks in parts.items()}
    for name in parts:
        preds = [task.labels[int(i)] for i in scores[name].argmax(dim=1)]
        results[name] = {
            "seconds": seconds[name],
            "accuracy": accuracy(preds, golds),
            "macro_f1": macro_f1(preds, golds, labels=task.labels),
            "sequences": sequences[name],
            "tokens": tokens[name],
        }
    diff = float((scores["one_pass"] - scores["per_label"]).abs().max())
    results["one_pass"]["max_abs_diff"] = diff
    speedup = results["per_label"]["seconds"] / results["one_pass"]["seconds"]
    table = Table(
        title=f"bench eval: {cfg.model.name}, {len(examples)} test examples x "
        f"{len(task.labels)} labels, {torch.get_num_threads()} threads"
    )
    for col in ("path", "sequences", "tokens", "seconds", "accuracy", "macro-F1", "max |diff|"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for name, r in results.items():
        table.add_row(
            name + (" (baseline)" if name == "per_label" else f" ({speedup:.1f}x)"),
            str(r["sequences"]),
            str(r["tokens"]),
            f"{r['seconds']:.1f}",
            f"{r['accuracy']:.3f}",
            f"{r['macro_f1']:.3f}",
            f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "",
        )
    console.print(table)
    return {
        "bench": "eval",
        "model": cfg.model.name,
        "dataset": cfg.data.dataset,
        "examples": len(examples),
        "labels": len(task.labels),
        "threads": torch.get_num_threads(),
        "speedup": speedup,
        "results": results,
    }
