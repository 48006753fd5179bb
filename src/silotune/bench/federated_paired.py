"""Paired measurements for `bench federated`: what secure aggregation itself does to accuracy.

Independent federated runs differ by training noise as well as by their aggregation: training
amplifies a difference of a few 1e-9 in the global adapter (the size of masking's fixed-point step
and of float32 rounding) round after round. ``paired_last_round`` separates the aggregation from
that: from the ``none`` run's global adapter after round R-1, recompute every silo's round-R update
once, aggregate those same updates plain, with pairwise masking and with HE, apply each aggregate
and evaluate each model on the test split. Any accuracy difference here is caused by secure
aggregation and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from silotune.adapters.peft_adapters import read_adapter_dir, set_adapter_state
from silotune.bench.secagg import masking_round
from silotune.config import JobConfig
from silotune.crypto import he
from silotune.eval.evaluate import evaluate
from silotune.federated import silo
from silotune.federated.vectors import flatten, load_flat
from silotune.train.checkpoint import CHECKPOINTS

ADAPTER_FILE = "adapter_model.safetensors"


def _round_dir(run_dir: Path, round_no: int) -> Path:
    path = run_dir / CHECKPOINTS / f"step-{round_no:08d}"
    if not (path / ADAPTER_FILE).is_file():
        raise FileNotFoundError(
            f"{path} holds no adapter: the run must keep every round's checkpoint "
            "(train.keep_checkpoints >= federation.rounds)"
        )
    return path


def _secure_sums(
    xs: list[NDArray[np.float32]], examples: list[int], clip: float
) -> dict[str, NDArray[np.float32]]:
    """The weighted sum of the same updates: plain (float64), masked, and HE-encrypted."""
    weights = [n / sum(examples) for n in examples]
    plain = np.sum([w * x.astype(np.float64) for x, w in zip(xs, weights, strict=True)], axis=0)
    _, masked, _ = masking_round(xs, examples=examples, clip=clip)
    keys = he.HeKeys.generate(he.HeParams(clip=clip))
    cts = [he.encrypt_update(keys, x, w) for x, w in zip(xs, weights, strict=True)]
    total = he.decrypt_aggregate(keys, he.aggregate(keys.serialize_public(), cts), xs[0].size)
    return {"none": plain.astype(np.float32), "masking": masked, "he": total}


def paired_last_round(cfg: JobConfig) -> dict[str, dict[str, float]]:
    """Aggregate one set of round-R silo updates three ways; test accuracy of each result.

    `cfg` is the finished ``none`` run's config (FedAvg or FedProx, every silo in every round,
    no pruning or DP), whose output folder holds the round R-1 checkpoint. The silos recompute
    round R with fresh optimizers (a run's kept AdamW moments are not saved), so with
    ``local_optimizer: persistent`` the updates are not the run's own round-R updates; they are
    still one set of updates, aggregated three ways.
    """
    fed = cfg.federation
    if fed.strategy == "fedadam" or fed.fraction < 1 or fed.pruning.enabled or fed.dp.enabled:
        raise ValueError("the paired check needs fedavg/fedprox, fraction 1, no pruning, no DP")
    job = silo.local_job(cfg)
    last = fed.rounds
    _, tensors = read_adapter_dir(_round_dir(cfg.output_dir, last - 1))
    set_adapter_state(job.model, tensors)
    start = flatten(job.model)
    results = [silo.local_round(cfg, p, start, last, None, None)[0] for p in range(fed.silos)]
    sums = _secure_sums([r.values for r in results], [r.examples for r in results], fed.secagg_clip)
    out: dict[str, dict[str, float]] = {}
    for name, mean in sums.items():
        step = (np.float32(fed.effective_server_lr) * mean).astype(np.float32)
        load_flat(job.model, start + step)
        scores = evaluate(
            job.model, job.task, job.splits.test, cfg.train.eval_batch_size, job.device
        )
        out[name] = {
            "accuracy": scores["accuracy"],
            "macro_f1": scores["macro_f1"],
            "max_abs_diff": float(np.abs(mean.astype(np.float64) - sums["none"]).max()),
        }
    return out


def summarise(paired: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Accuracy points of each secure method vs plain aggregation of the same updates."""
    base = paired["none"]["accuracy"]
    return {m: round(100 * (paired[m]["accuracy"] - base), 2) for m in ("masking", "he")}
