"""The run folder every mode writes: file names, output-dir checks, the metrics log, the summary.

A run writes to ``output_dir``: ``config.yaml`` (the resolved job), ``metrics.jsonl`` (one JSON
object per log or evaluation), ``checkpoints/``, ``adapter/`` (PEFT format) and
``summary.json``; a split run keeps each silo's own outputs in ``silos/<name>/``, and
``silotune report`` writes ``report/``. Every mode (centralized, federated, split, adapter-in-TEE)
uses this module for that contract instead of its own copy. It imports no torch, so that readers
of run folders (``silotune report``) start fast.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from silotune.config import JobConfig, dump_config, load_config
from silotune.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from silotune.train.loop import StepOutput

CONFIG_FILE = "config.yaml"


METRICS_FILE = "metrics.jsonl"


SUMMARY_FILE = "summary.json"


ADAPTER_DIR = "adapter"


SILOS_DIR = "silos"  # a split run's per-silo outputs: silos/<name>/


REPORT_DIR = "report"  # silotune report's plots and page


RUN_ENTRIES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, ADAPTER_DIR, "checkpoints", REPORT_DIR)


# Keys that may change between a run and its resumption (they do not change what is computed).
# train.max_steps only with a constant schedule: linear and cosine decay depend on it.
RESUMABLE_CHANGES = {
    "output_dir",
    "train.max_steps",
    "train.eval_every",
    "train.log_every",
    "train.keep_checkpoints",
}


# In split mode, also where the coordinator is and which key, TLS and timeout settings a side uses.
SPLIT_RESUMABLE_CHANGES = {"split.address", "split.keys_dir", "split.tls_dir", "split.timeout_s"}


def flatten_keys(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys: ``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        out.update(flatten_keys(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def check_output_dir(cfg: JobConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run or resume an incompatible one; writes nothing."""
    out = cfg.output_dir
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pick one")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file, not a folder")
    has_run = out.is_dir() and any((out / e).exists() for e in RUN_ENTRIES)
    if resume:
        from silotune.train.checkpoint import latest_checkpoint

        if latest_checkpoint(out) is None:
            raise CheckpointError(f"--resume: {out} holds no checkpoint to resume from")
        saved = flatten_keys(load_config(out / CONFIG_FILE).model_dump(mode="json"))
        now = flatten_keys(cfg.model_dump(mode="json"))
        split = cfg.mode == "split"
        unused = ("federation.",) if split else ("federation.", "split.")  # sections not read
        allowed = RESUMABLE_CHANGES | (SPLIT_RESUMABLE_CHANGES if split else set())
        changed = sorted(
            k
            for k in now
            if saved.get(k) != now[k] and k not in allowed and not k.startswith(unused)
        )
        if changed:
            raise ConfigError(
                f"--resume: the config differs from the run in {out} at {', '.join(changed)}; "
                f"only {', '.join(sorted(allowed))} may change"
            )
        if (
            saved.get("train.max_steps") != now["train.max_steps"]
            and cfg.train.scheduler != "constant"
        ):
            raise ConfigError(
                f"--resume: train.max_steps cannot change with the {cfg.train.scheduler} scheduler "
                "(its learning rates depend on max_steps); start a new run instead"
            )
        return
    if has_run and not overwrite:
        state = (
            "a finished run" if (out / SUMMARY_FILE).exists() else "an unfinished run (--resume)"
        )
        raise ConfigError(f"output_dir {out} already holds {state}; pass --overwrite to replace it")


def reset_output_dir(cfg: JobConfig) -> None:
    """Remove only silotune's own files from output_dir and write the run's config.yaml."""
    out = cfg.output_dir
    for entry in RUN_ENTRIES:
        path = out / entry
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(dump_config(cfg), encoding="utf-8")


def prepare_output_dir(cfg: JobConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run; on --overwrite remove only silotune's own files in the folder."""
    check_output_dir(cfg, resume, overwrite)
    if not resume:
        reset_output_dir(cfg)


def train_record(step: int, out: StepOutput, elapsed_s: float, **extra: Any) -> dict[str, Any]:
    """The metrics.jsonl record of a training step (modes add their own fields in `extra`)."""
    return {
        "step": step,
        "split": "train",
        "loss": out.loss,
        "lr": out.lr,
        "grad_norm": out.grad_norm,
        "elapsed_s": elapsed_s,
        **extra,
    }


class MetricsLog:
    """Append-only JSONL metrics.

    On resume, records past the checkpoint's step are dropped, and so are test records (they
    belong to the end of a run; the resumed run writes its own) and a line torn by a crash.
    """

    def __init__(self, path: Path, keep_until_step: int | None = None) -> None:
        self.path = path
        if keep_until_step is not None and path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if (
                    isinstance(record, dict)
                    and record.get("step", 0) <= keep_until_step
                    and record.get("split") != "test"
                ):
                    kept.append(line)
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def write_summary(
    cfg: JobConfig,
    train_s: float | None,
    test: dict[str, float] | None,
    *,
    out_dir: Path | None = None,
    with_steps: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """Write and return a run's ``summary.json`` under ``out_dir`` (default ``output_dir``).

    Every mode's summary has ``mode``, its own keys (``extra``, in order), ``steps``
    (``train.max_steps``, unless ``with_steps`` is false: federated counts rounds),
    ``train_seconds``, ``test`` and ``adapter``; a coordinator that trains no adapter of its own
    passes ``train_s`` and ``test`` as None and gets only ``mode`` and its keys.
    """
    out = out_dir or cfg.output_dir
    summary: dict[str, Any] = {"mode": cfg.mode, **extra}
    if with_steps and test is not None:
        summary["steps"] = cfg.train.max_steps
    if test is not None:
        summary.update(train_seconds=train_s, test=test, adapter=str(out / ADAPTER_DIR))
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def report_hint(folder: Path) -> str:
    """Where a run's files are and the command that draws them (printed after a run)."""
    return f"run folder: {folder}; to plot it: silotune report {shlex.quote(str(folder))}"


def format_scores(scores: dict[str, float]) -> str:
    """Scores as `name=value` pairs for logs (the example count left out)."""
    return " ".join(f"{k}={v:.4f}" for k, v in scores.items() if k != "examples")
