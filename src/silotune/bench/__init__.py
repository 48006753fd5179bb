"""Benchmarks (`silotune bench NAME`): each compares against a baseline in the same run, prints a
table, then one JSON object as its last line."""

from __future__ import annotations

import importlib
import json
from typing import Any

from rich.console import Console

from silotune.errors import ConfigError

# name -> (description, module). Each module defines `run(quick: bool, console: Console) -> dict`
# that prints its table and returns the JSON object; the JSON line is printed here, last.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "finetune": (
        "LoRA fine-tuning vs the untuned model (smollm2-135m on fortunes)",
        "silotune.bench.finetune",
    ),
    "eval": (
        "classification evaluation: every label from one pass over the prompt vs one pass per label",
        "silotune.bench.eval",
    ),
    "secagg": (
        "secure aggregation of a 4.2M-parameter LoRA update, 4 silos: plain, masking, he (BFV), FedShield CKKS",
        "silotune.bench.secagg",
    ),
    "federated": (
        "federated (none/masking/he, IID and Dirichlet) vs centralized accuracy, 3 silos",
        "silotune.bench.federated",
    ),
    "split": (
        "split training over gRPC+TLS+AEAD vs centralized (step time, bytes, RSS)",
        "silotune.bench.split",
    ),
    "enclave": (
        "simulated enclave: split trunk and adapter-in-TEE cost vs plain; SPF+LoRA vs LoRA accuracy",
        "silotune.bench.enclave",
    ),
    "instruct": (
        "instruction tuning (ROUGE-L, exact match, multiple choice): untuned vs centralized vs "
        "federated (masking; one domain per silo, and IID) vs split",
        "silotune.bench.instruct",
    ),
    "privacy": (
        "privacy attacks (split inversion and labels, enclave ciphertext, TEE tokens and LoRA "
        "weights, federated membership) vs defences",
        "silotune.bench.privacy",
    ),
}


def run_benchmark(name: str, quick: bool, console: Console) -> dict[str, Any]:
    """Run benchmark `name`; its JSON result is the last line on stdout."""
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark '{name}' (available: {', '.join(BENCHMARKS)})")
    module = importlib.import_module(BENCHMARKS[name][1])
    result: dict[str, Any] = module.run(quick=quick, console=console)
    console.file.flush()
    print(json.dumps(result), flush=True)  # noqa: T201 - the machine-readable last line
    return result
