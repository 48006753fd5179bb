"""Federated mode: membership inference by the coordinator on what it learns from a round.

Attacker
    The coordinator.
Observes
    The global adapter it computes from what it received in a round of a real federated job
    (``silotune train`` with ``mode: federated``, Flower simulation): with
    ``federation.secure_aggregation: none`` each silo's update reaches it in clear, observed here
    as a one-silo federation on the target silo's data (the global update is that silo's update);
    with ``masking`` or ``he`` only the weighted average over the round's silos; with ``dp``
    the target's update clipped and noised, at the epsilon the job reports.
Knows in advance
    The public base model and initial adapter, the job's config (steps, lr, batch), and public
    text that is not the silos' (:func:`~silotune.attacks.public.public_texts`).
Attacks
    * ``loss``: an example is called a member if its loss under the observed adapter is low.
    * ``lira`` (offline likelihood ratio, Carlini et al. 2022): shadow adapters trained exactly as
      the silo trains (same steps, lr, batch, starting adapter), on public text only, give each
      example's loss distribution when it was *not* trained on; the score is how many of those
      standard deviations the observed loss lies below their mean. For an aggregate, each shadow
      is the average of as many public-text updates as the round has silos.
Metric
    AUC of the score for the target silo's training examples (members) against held-out examples
    of the same data set (validation and test, in no silo); TPR at 1% FPR.
Chance
    AUC 0.5; TPR at 1% FPR 0.01.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from silotune.adapters.peft_adapters import ADAPTER_WEIGHTS
from silotune.attacks.public import public_texts
from silotune.config import JobConfig
from silotune.data.partition import partition_iid
from silotune.data.registry import load_splits
from silotune.data.tasks import collate
from silotune.train.job import build_job
from silotune.train.loop import BatchStream, make_optimizer, train_step

__all__ = ["MIA_SETTINGS", "MIA_SETTINGS_SHORT", "auc", "run_mia", "tpr_at_fpr"]

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]
DP_CLIP = 2.0  # about half the L2 norm of a tiny-llama silo update of this recipe (measured 4.1)
MIA_SETTINGS: list[dict[str, Any]] = [
    {"silos": 1, "secure_aggregation": "none"},  # one silo's update, as `none` hands it over
    {"silos": 4, "secure_aggregation": "masking"},  # the aggregate of 4 silos
    {"silos": 4, "secure_aggregation": "he"},
    {"silos": 1, "secure_aggregation": "none",
     "dp": {"enabled": True, "clip_norm": DP_CLIP, "noise_multiplier": 1.0}},
    {"silos": 1, "secure_aggregation": "none",
     "dp": {"enabled": True, "clip_norm": DP_CLIP, "noise_multiplier": 4.0}},
]  # fmt: skip
# The SmolLM2 run (bench privacy, full): `he` hands the coordinator the same average as `masking`
# (equal to 4 decimals on tiny-llama), so it and the second DP level are left out to save time.
DP_CLIP_SHORT = 8.0  # about half the L2 norm of a smollm2-135m shadow update of that recipe (16.6)
MIA_SETTINGS_SHORT: list[dict[str, Any]] = [
    {"silos": 1, "secure_aggregation": "none"},
    {"silos": 4, "secure_aggregation": "masking"},
    {"silos": 1, "secure_aggregation": "none",
     "dp": {"enabled": True, "clip_norm": DP_CLIP_SHORT, "noise_multiplier": 1.0}},
]  # fmt: skip


def auc(members: list[float], others: list[float]) -> float:
    """Probability that a member scores above a non-member (ties count half)."""
    wins = sum((m > o) + 0.5 * (m == o) for m in members for o in others)
    return wins / (len(members) * len(others))


def tpr_at_fpr(members: list[float], others: list[float], fpr: float = 0.01) -> float:
    """Fraction of members above the threshold that lets at most ``fpr`` of non-members through."""
    ranked = sorted(others, reverse=True)
    allowed = int(fpr * len(ranked))  # non-members allowed strictly above the threshold
    threshold = ranked[allowed] if allowed < len(ranked) else -float("inf")
    return sum(m > threshold for m in members) / len(members)


@torch.no_grad()
def _losses(job: Any, state: Tensors, examples: list[dict], batch: int = 32) -> list[float]:
    """Mean token loss of each example under the base model plus adapter ``state``."""
    set_peft_model_state_dict(job.model, state)
    job.model.eval()
    pad = job.task.tokenizer.pad_token_id
    out: list[float] = []
    for start in range(0, len(examples), batch):
        enc = collate([job.task.encode(ex) for ex in examples[start : start + batch]], pad)
        logits = job.model(
            input_ids=enc["input_ids"].to(job.device),
            attention_mask=enc["attention_mask"].to(job.device),
        ).logits.float()  # (B, T, V)
        labels = enc["labels"][:, 1:].to(job.device)  # (B, T-1)
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )  # (B, T-1)
        counts = (labels != -100).sum(1).clamp_min(1)
        out.extend((ce.sum(1) / counts).tolist())
    return out


def _train_shadow(job: Any, start: Tensors, texts: list[str], steps: int, seed: int) -> Tensors:
    """The silo's local loop (same steps, lr, batch, starting adapter) on public texts."""
    set_peft_model_state_dict(job.model, start)
    cfg = job.config.train.model_copy(update={"seed": seed, "warmup_steps": 0})
    encoded = [job.task.encode({"text": t, "label": ""}) for t in texts]
    stream = BatchStream(encoded, cfg.batch_size, seed, job.task.tokenizer.pad_token_id)
    optimizer = make_optimizer(job.model, cfg)
    for step in range(steps):
        train_step(job.model, stream, step, optimizer, None, cfg, job.device)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(job.model).items()}


def _federated_job(cfg: JobConfig, out: Path, data: str, **federation: Any) -> JobConfig:
    job = cfg.model_copy(deep=True)
    job.output_dir = out
    job.data.dataset = data
    fed = job.federation.model_copy(update={"rounds": 1, "simulation": True, "eval_every": 1000})
    for key, value in federation.items():
        setattr(fed, key, value)
    job.federation = fed
    return job


def _write_dataset(folder: Path, train: list[dict], held_out: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    half = len(held_out) // 2
    for name, rows in (
        ("train", train),
        ("validation", held_out[:half]),
        ("test", held_out[half:]),
    ):
        text = "".join(json.dumps(r) + "\n" for r in rows)
        (folder / f"{name}.jsonl").write_text(text, encoding="utf-8")


def run_mia(
    cfg: JobConfig,
    settings: list[dict[str, Any]] | None = None,
    shadows: int = 4,
    members: int = 100,
    held_out: int | None = None,
) -> dict[str, Any]:
    """Rows of ``{"setting", "leakage" (LiRA AUC), "chance", ...}`` for each federation setting.

    ``cfg`` is a federated job (its data set, model, adapter and train section are used, with
    ``data.task: lm``); each setting updates its ``federation`` section (one round). Members are
    the first ``members`` examples of the target silo's part; non-members the first ``held_out``
    validation and test examples (all by default).
    """
    from silotune.dispatch import run_job

    settings = settings or MIA_SETTINGS
    base = cfg.model_copy(deep=True)
    base.mode = "federated"
    base.data.task = "lm"
    splits = load_splits(base.data, seed=base.train.seed)
    target = partition_iid(len(splits.train), 4, base.train.seed)[0][:members]
    member_rows = [splits.train[i] for i in target]
    held_out_rows = (splits.validation + splits.test)[:held_out]
    job = build_job(base)
    start = {k: v.detach().clone() for k, v in get_peft_model_state_dict(job.model).items()}
    steps = base.federation.local_steps
    most = max(int(setting.get("silos", 1)) for setting in settings)  # updates per shadow
    corpus = public_texts(base, shadows * most * members, seed=7)
    singles = [
        _train_shadow(job, start, corpus[i * members : (i + 1) * members], steps, seed=100 + i)
        for i in range(shadows * most)
    ]
    rows = []
    shadow_losses: dict[int, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="silotune-mia-") as tmp:
        own = Path(tmp) / "target-silo-data"
        _write_dataset(own, member_rows, held_out_rows)
        for i, setting in enumerate(settings):
            k = int(setting.get("silos", 1))
            data = str(own) if k == 1 else base.data.dataset
            extra = {"min_silos": min(k, 2), "partition": "iid", **setting}
            fed_cfg = _federated_job(base, Path(tmp) / f"run-{i}", data, **extra)
            summary = run_job(fed_cfg, overwrite=True, progress=False)
            observed = load_file(str(Path(summary["adapter"]) / ADAPTER_WEIGHTS))
            if k not in shadow_losses:  # shadows of one update, or of the mean of k updates
                group = [singles[j : j + k] for j in range(0, len(singles) - k + 1, k)][:shadows]
                states = [{n: sum(s[n] for s in g) / k for n in start} for g in group]
                shadow_losses[k] = torch.tensor(
                    [_losses(job, s, member_rows + held_out_rows) for s in states]
                )  # (S, N)
            rows.append(
                _score(job, observed, shadow_losses[k], member_rows, held_out_rows, start, setting,
                       summary)
            )  # fmt: skip
            log.info("MIA %s: %s", setting, rows[-1])
    return {"rows": rows}


def _score(
    job: Any,
    observed: Tensors,
    shadow: torch.Tensor,
    member_rows: list[dict],
    held_out: list[dict],
    start: Tensors,
    setting: dict[str, Any],
    summary: dict[str, Any],
) -> dict[str, Any]:
    examples = member_rows + held_out
    target = torch.tensor(_losses(job, observed, examples))
    mu, sd = shadow.mean(0), shadow.std(0) + shadow.std(0).median() * 0.1 + 1e-6
    lira = ((mu - target) / sd).tolist()
    loss = (-target).tolist()
    n = len(member_rows)
    set_peft_model_state_dict(job.model, start)
    dp = summary.get("dp") or {}
    return {
        "setting": {**setting, "members": n, "non_members": len(held_out)},
        "leakage": auc(lira[:n], lira[n:]),
        "chance": 0.5,
        "loss_auc": auc(loss[:n], loss[n:]),
        "tpr_at_1pct_fpr": tpr_at_fpr(lira[:n], lira[n:]),
        "loss_tpr_at_1pct_fpr": tpr_at_fpr(loss[:n], loss[n:]),
        "epsilon": dp.get("epsilon"),
        "cost": {"test_loss": summary.get("test", {}).get("loss")},
    }
