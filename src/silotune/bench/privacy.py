"""`silotune bench privacy`: every attack of `silotune.attacks` against the settings that should stop it.

Split jobs (one silo, in process, through the real trunk service) on fortunes-sample; tiny-llama
with ``--quick``, SmolLM2-135M otherwise. For each attack, rows of ``{"setting", "leakage",
"chance", "cost"}``: the attack on the default split (``head_layers`` 1, no noise, float32), then
on each defence (more head layers, noise, a narrower wire dtype, a trained head adapter, the trunk
in the enclave; for the gradient side more tail layers and noise). The cost of a setting comes from
the same run: step time, and for the settings trained ``ACCURACY_STEPS`` steps, the test accuracy (for
the adapter in the TEE: the enclave's step time and its adapter's difference from the plain
trainer's after ``TEE_STEPS`` steps; for federated membership: the global adapter's test loss).
The adapter-in-TEE attacks run on tiny-llama in both variants; federated membership inference
on tiny-llama with ``--quick`` and on a shorter SmolLM2 recipe otherwise (``MIA_SMOLLM2``).
Noise levels are multiples of the RMS of the default run's head activations, measured in this run.
One PNG per attack (leakage against step time, and against accuracy where measured) goes to
``$SILOTUNE_BENCH_OUT`` (default ``./bench-out``)``/privacy``. A table, then one JSON line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from silotune.adapter_tee.runner import compare_with_plain
from silotune.attacks import format_leakage
from silotune.attacks.federated_mia import MIA_SETTINGS, MIA_SETTINGS_SHORT, run_mia
from silotune.attacks.observe import SplitObservation, observe_split
from silotune.attacks.run import AttackCache, run_attack
from silotune.attacks.tee_masks import tee_job, tee_leakage
from silotune.attacks.tee_weights import weight_row
from silotune.config import JobConfig, config_from_dict

log = logging.getLogger(__name__)

NOISE_FACTORS = (0.25, 1.0, 4.0)  # noise_sigma as multiples of the head activations' RMS
TEE_STEPS = 5  # adapter-in-TEE steps compared with the plain trainer for the masks' cost
WEAK_MASK_STDS = (1e-3, 0.1)  # fresh-mask stds below the tested ones, for tee-weights only


# Federated membership inference: tiny-llama (quick) and a shorter SmolLM2 recipe (full): shorter
# texts, fewer steps, members and held-out texts, and the settings of MIA_SETTINGS_SHORT. It took
# 28 minutes on one core of the shared build machine under load, where the tiny recipe on SmolLM2
# would take about an hour.
MIA_TINY = {"model": "tiny-llama", "max_length": 64, "local_steps": 30, "members": 100,
            "held_out": None, "settings": MIA_SETTINGS}  # fmt: skip
MIA_SMOLLM2 = {"model": "smollm2-135m", "max_length": 32, "local_steps": 16, "members": 64,
               "held_out": 96, "settings": MIA_SETTINGS_SHORT}  # fmt: skip


def _grid(quick: bool) -> dict[str, Any]:
    if quick:
        return {"model": "tiny-llama", "max_length": 64, "accuracy_steps": 20, "eval": 40,
                "inverter_steps": 150, "inverter_texts": 600, "tee_model": "tiny-llama",
                "mia": MIA_TINY}  # fmt: skip
    return {"model": "smollm2-135m", "max_length": 128, "accuracy_steps": 30, "eval": 80,
            "inverter_steps": 200, "inverter_texts": 1000, "tee_model": "tiny-llama",
            "mia": MIA_SMOLLM2}  # fmt: skip


def _job(grid: dict[str, Any], **split: Any) -> JobConfig:
    return config_from_dict(
        {
            "mode": "split",
            "model": grid["model"],
            "adapter": {"type": "lora", "r": 8},
            "data": {"dataset": "fortunes-sample", "max_length": grid["max_length"]},
            "train": {
                "max_steps": grid["accuracy_steps"],
                "batch_size": 8,
                "lr": 1e-3,
                "eval_every": 10_000,
                "log_every": 10_000,
            },  # fmt: skip
            "split": {"silos": 1, "timeout_s": 900, "head_layers": 1, "tail_layers": 1, **split},
        }
    )


def _tee_rows(grid: dict[str, Any], console: Console) -> dict[str, list[dict[str, Any]]]:
    """Adapter in the TEE: tokens and LoRA weights, fresh vs reused masks; the fresh masks' cost."""
    rows: dict[str, list[dict[str, Any]]] = {"tee-masks": [], "tee-weights": []}
    model = grid["tee_model"]
    tee = tee_job(_job({**grid, "model": model, "max_length": 64}))
    for mask_std in (1.0, 1e4):
        job = {**tee, "enclave": {**tee.get("enclave", {}), "mask_std": mask_std}}
        compared = compare_with_plain(job, TEE_STEPS, in_process=True)  # the fresh masks' cost
        cost = {"step_s": compared["enclave_step_s"], "plain_step_s": compared["plain_step_s"],
                "adapter_max_abs_diff": compared["max_abs_diff"]}  # fmt: skip
        for reuse in (False, True):
            console.log(f"privacy bench: tee-masks, tee-weights mask_std {mask_std} reused {reuse}")
            row = tee_leakage(tee, mask_std, reuse)
            setting = {"model": model, "mask_std": mask_std, "reused_mask": reuse}
            rows["tee-masks"].append({"setting": setting, **row, "cost": {} if reuse else cost})
            weights = weight_row(tee, model, mask_std, reuse)
            weights["cost"] = {**weights["cost"], **({} if reuse else cost)}
            rows["tee-weights"].append(weights)
    for mask_std in WEAK_MASK_STDS:  # where fresh masks stop hiding the weights
        console.log(f"privacy bench: tee-weights mask_std {mask_std} fresh")
        rows["tee-weights"].append(weight_row(tee, model, mask_std, False))
    return rows


def _mia_rows(mia: dict[str, Any]) -> list[dict[str, Any]]:
    """One federated round per setting of ``mia``, 4 shadows; the rows of ``run_mia``."""
    job = config_from_dict(
        {
            "mode": "federated",
            "model": mia["model"],
            "adapter": {"type": "lora", "r": 8},
            "data": {"dataset": "fortunes-sample", "task": "lm", "max_length": mia["max_length"]},
            "train": {"batch_size": 8, "lr": 5e-3, "eval_batch_size": 32},
            "federation": {"silos": 4, "rounds": 1, "local_steps": mia["local_steps"],
                           "min_silos": 2},
        }
    )  # fmt: skip
    rows: list[dict[str, Any]] = run_mia(
        job, mia["settings"], members=mia["members"], held_out=mia["held_out"]
    )["rows"]
    for row in rows:
        row["setting"] = {"model": mia["model"], **row["setting"]}
    return rows


def _rms(obs: SplitObservation) -> float:
    hidden, mask = obs.hidden[0], obs.mask[0].bool()
    return float(hidden[mask].pow(2).mean().sqrt())


def run(quick: bool, console: Console) -> dict[str, Any]:
    """Run every attack over its settings; print the table; return the JSON object."""
    torch.set_num_threads(1)
    grid = _grid(quick)
    cache = AttackCache(grid["inverter_steps"], grid["inverter_texts"])
    steps = grid["accuracy_steps"]
    results: dict[str, list[dict[str, Any]]] = {
        "split-nearest": [], "split-learned": [], "split-ciphertext": [], "split-labels": [],
        "tee-masks": [], "tee-weights": [], "federated-mia": [],
    }  # fmt: skip

    def attack(names: tuple[str, ...], cfg: JobConfig, trained: int = 0, evals: int = 0) -> None:
        console.log(
            f"privacy bench: {names} {cfg.split.model_dump(include=_KEYS)} trained {trained}"
        )
        obs = observe_split(cfg, trained + 2, eval_examples=evals)
        for name in names:
            row = run_attack(name, cfg, trained_steps=trained, cache=cache, obs=obs)
            results[name].append(row)
        return obs

    both = ("split-nearest", "split-learned")
    # Trained runs first: the default split (also the accuracy baseline) and the defences.
    base = attack((*both, "split-labels"), _job(grid), trained=steps, evals=grid["eval"])
    rms = _rms(base)
    attack(both, _job(grid, head_layers=4), trained=steps, evals=grid["eval"])
    for factor in NOISE_FACTORS[1:]:
        cfg = _job(grid, noise_sigma=round(factor * rms, 6))
        attack((*both, "split-labels"), cfg, trained=steps, evals=grid["eval"])
    # Before training: head depth, noise, wire dtype, tail depth.
    for h in (0, 1, 2, 4):
        attack(both, _job(grid, head_layers=h))
    attack(both, _job(grid, noise_sigma=round(NOISE_FACTORS[0] * rms, 6)))
    for dtype in ("float16", "bfloat16"):
        attack(both, _job(grid, activation_dtype=dtype))
    for t in (1, 2, 4):
        attack(("split-labels",), _job(grid, tail_layers=t))
    attack(("split-ciphertext",), _job(grid, trunk_in_enclave=True))
    # Adapter in the TEE (tiny-llama: the masked path runs every frozen matmul through the REE).
    results.update(_tee_rows(grid, console))
    # Federated membership inference: one round of every setting plus 16 shadow trainings.
    console.log(f"privacy bench: federated-mia ({grid['mia']['model']})")
    results["federated-mia"] = _mia_rows(grid["mia"])
    _print(console, grid["model"], results, rms)
    plots = _plots(results, Path(os.environ.get("SILOTUNE_BENCH_OUT", "bench-out")) / "privacy")
    return {"bench": "privacy", "model": grid["model"], "activation_rms": rms,
            "results": results, "plots": plots}  # fmt: skip


_KEYS = {"head_layers", "tail_layers", "noise_sigma", "activation_dtype", "trunk_in_enclave"}


def _label(setting: dict[str, Any]) -> str:
    if "secure_aggregation" in setting:
        dp = setting.get("dp")
        extra = f", DP sigma {dp['noise_multiplier']:g}" if dp else ""
        return f"{setting['silos']} silo(s), {setting['secure_aggregation']}{extra}"
    if "mask_std" in setting:
        return (
            f"mask_std {setting['mask_std']:g}, {'reused' if setting['reused_mask'] else 'fresh'}"
        )
    parts = [f"h{setting['head_layers']}", f"t{setting['tail_layers']}"]
    if setting["noise_sigma"]:
        parts.append(f"noise {setting['noise_sigma']:g}")
    if setting["activation_dtype"] != "float32":
        parts.append(setting["activation_dtype"])
    if setting["trunk_in_enclave"]:
        parts.append("enclave")
    if setting["trained_steps"]:
        parts.append(f"after {setting['trained_steps']} steps")
    return " ".join(parts)


def _print(console: Console, model: str, results: dict[str, Any], rms: float) -> None:
    table = Table(title=f"bench privacy: {model} (head activation RMS {rms:.3g})")
    cols = ("attack", "setting", "leakage", "chance", "detail", "step s", "accuracy")
    for col in cols:
        table.add_column(col, justify="left" if col in ("attack", "setting") else "right")
    for name, rows in results.items():
        for row in rows:
            cost = row["cost"]
            table.add_row(
                name,
                _label(row["setting"]),
                format_leakage(name, row["leakage"]),
                format_leakage(name, row["chance"]),
                _detail(row),
                f"{cost['step_s']:.2f}" if "step_s" in cost else "",
                f"{cost['accuracy']:.3f}" if "accuracy" in cost else "",
            )
    Console(file=console.file, width=max(console.width, 150)).print(table)


def _detail(row: dict[str, Any]) -> str:
    """The attack's second number: exact sentences, TPR at 1% FPR, or cosine per LoRA target."""
    if "sentences" in row:
        return f"sentences {row['sentences']:.1%}"
    if "by_target" in row:
        return ", ".join(f"{t} {v['cosine']:.2f}" for t, v in row["by_target"].items())
    if "tpr_at_1pct_fpr" not in row:
        return ""
    eps = f", eps {row['epsilon']:.2f}" if row.get("epsilon") is not None else ""
    return f"TPR@1% {row['tpr_at_1pct_fpr']:.2f}{eps}"


def _plots(results: dict[str, Any], folder: Path) -> dict[str, str]:
    """One PNG per attack: leakage against step time, and against accuracy where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, rows in results.items():
        if name == "federated-mia":
            written[name] = _mia_plot(rows, folder / f"{name}.png", plt)
            continue
        if name == "tee-weights":
            written[name] = _mask_plot(rows, folder / f"{name}.png", plt)
            continue
        timed = [r for r in rows if "step_s" in r["cost"]]
        if not timed:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        second = ("accuracy", "test accuracy")
        if not any("accuracy" in r["cost"] for r in timed):
            second = ("adapter_max_abs_diff", "adapter max abs diff vs plain")
        for ax, key, xlabel in ((axes[0], "step_s", "step time (s)"), (axes[1], *second)):
            points = [r for r in timed if key in r["cost"]]
            for r in points:
                ax.scatter(r["cost"][key], r["leakage"], color="tab:red")
                ax.annotate(_label(r["setting"]), (r["cost"][key], r["leakage"]), fontsize=7)
            if points:
                ax.axhline(max(r["chance"] for r in points), ls="--", color="grey", label="chance")
                ax.legend(loc="lower right", fontsize=7)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("leakage")
            ax.set_ylim(-0.02, 1.02)
        written[name] = _save(fig, folder / f"{name}.png", f"{name}: leakage vs cost", plt)
    return written


def _mask_plot(rows: list[dict[str, Any]], path: Path, plt: Any) -> str:
    """Weight recovery against ``enclave.mask_std``, fresh vs reused masks; step time where measured."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for reuse, color in ((False, "tab:blue"), (True, "tab:red")):
        points = sorted((r for r in rows if r["setting"]["reused_mask"] == reuse),
                        key=lambda r: r["setting"]["mask_std"])  # fmt: skip
        xs = [r["setting"]["mask_std"] for r in points]
        ax.plot(xs, [r["leakage"] for r in points], "o-", color=color,
                label="one reused mask (test-only hook)" if reuse else "fresh masks (the product)")  # fmt: skip
        for r in points:
            if "step_s" in r["cost"]:
                note = f"{r['cost']['step_s']:.2f} s/step (plain {r['cost']['plain_step_s']:.2f})"
                ax.annotate(note, (r["setting"]["mask_std"], r["leakage"]), fontsize=7)
    ax.axhline(max(r["chance"] for r in rows), ls="--", color="grey", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("enclave.mask_std")
    ax.set_ylabel("cosine, recovered vs true LoRA delta")
    ax.set_ylim(-0.05, 1.02)
    ax.legend(loc="center right", fontsize=7)
    return _save(fig, path, "tee-weights: leakage vs mask_std (and step time)", plt)


def _save(fig: Any, path: Path, title: str, plt: Any) -> str:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _mia_plot(rows: list[dict[str, Any]], path: Path, plt: Any) -> str:
    """Membership AUC against the global model's test loss (the accuracy cost of DP)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rows:
        x = r["cost"].get("test_loss") or 0.0
        ax.scatter(x, r["leakage"], color="tab:red")
        ax.annotate(_label(r["setting"]), (x, r["leakage"]), fontsize=7)
    ax.axhline(0.5, ls="--", color="grey", label="chance")
    ax.set_xlabel("test loss of the global adapter after the round")
    ax.set_ylabel("membership AUC (LiRA)")
    ax.set_ylim(0.3, 1.02)
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path, "federated-mia: leakage vs cost", plt)
