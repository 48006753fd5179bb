"""Resolve `data.dataset` (a bundled name or a local folder) into train/validation/test examples."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from silotune.config import DataConfig
from silotune.data import dictionaries
from silotune.data.files import load_split_dir
from silotune.data.fortunes import DEFAULT_ROOT, SAMPLE_DIR, build_fortunes_splits
from silotune.data.instruct_files import (
    MC_FILE,
    load_instruction_dir,
    load_multiple_choice,
    to_messages,
)
from silotune.data.tasks import make_task
from silotune.errors import DataError

NAMED = {
    "fortunes-sample": "bundled sample of Debian fortunes (4 categories, no apt needed)",
    "fortunes": "Debian fortunes, 6 largest categories, 80/10/10 split (apt-get install fortunes)",
    "dictionaries-sample": "bundled instruction sample: define terms of 3 dictionaries (no apt "
    "needed)",
    "dictionaries": "define terms from FOLDOC, the Jargon File and WordNet (apt-get install "
    "dict-foldoc dict-jargon wordnet-base)",
}
INSTRUCTION_DATASETS = ("dictionaries-sample", "dictionaries")
FORTUNES_TEMPLATE = "Fortune: {text}\nCategory:"
GENERIC_TEMPLATE = "{text}\nLabel:"


@dataclass
class DatasetSplits:
    """Examples per split plus what the task needs to know about them."""

    train: list[dict]
    validation: list[dict]
    test: list[dict]
    labels: list[str]  # sorted label set of the training split ([] for LM and instruction)
    prompt_template: str
    multiple_choice: list[dict[str, Any]] = field(default_factory=list)  # instruction only


def _cap(examples: list[dict], cap: int | None) -> list[dict]:
    """A fixed, order-preserving random subset (files are often sorted by label, so no head slice)."""
    if cap is None or len(examples) <= cap:
        return examples
    keep = sorted(random.Random(0).sample(range(len(examples)), cap))
    return [examples[i] for i in keep]


def _instruction_splits(cfg: DataConfig, seed: int) -> tuple[dict, list[dict[str, Any]]]:
    """Records per split and the multiple-choice records of an instruction dataset."""
    if cfg.dataset == "dictionaries":
        missing = dictionaries.packages_missing()
        if missing:
            raise DataError(
                f"data.dataset dictionaries needs the Debian packages {', '.join(missing)} "
                f"(apt-get install {' '.join(missing)}), or use dictionaries-sample"
            )
        built = dictionaries.build_dictionary_splits(seed=seed)
        splits = {
            name: [to_messages(Path(name), f"record {i}", r) for i, r in enumerate(built[name], 1)]
            for name in ("train", "validation", "test")
        }
        mc = [dict(r) for r in built["multiple_choice"]]
        return splits, mc
    if cfg.dataset in NAMED and cfg.dataset not in INSTRUCTION_DATASETS:
        raise DataError(
            f"data.dataset '{cfg.dataset}' holds no instruction records; data.task instruction "
            f"needs {', '.join(INSTRUCTION_DATASETS)} or a folder of instruction files"
        )
    path = dictionaries.SAMPLE_DIR if cfg.dataset == "dictionaries-sample" else _folder(cfg)
    mc_path = path / MC_FILE
    mc = load_multiple_choice(mc_path) if mc_path.is_file() else []
    return load_instruction_dir(path), mc


def _folder(cfg: DataConfig) -> Path:
    path = Path(cfg.dataset).expanduser()
    if not path.is_dir():
        raise DataError(
            f"data.dataset '{cfg.dataset}' is neither a bundled dataset ({', '.join(NAMED)}) nor "
            "a folder holding train/validation/test files"
        )
    return path


def load_splits(cfg: DataConfig, seed: int = 0) -> DatasetSplits:
    """Load the dataset named in `cfg` and check it fits the task."""
    if cfg.task == "instruction":
        splits, mc = _instruction_splits(cfg, seed)
        for name in ("train", "validation", "test"):
            if not splits.get(name):
                raise DataError(f"data.dataset '{cfg.dataset}' has no examples in its {name} split")
        return DatasetSplits(
            train=splits["train"],
            validation=_cap(splits["validation"], cfg.max_eval_examples),
            test=_cap(splits["test"], cfg.max_eval_examples),
            labels=[],
            prompt_template="",
            multiple_choice=_cap(mc, cfg.max_eval_examples),
        )
    if cfg.dataset in INSTRUCTION_DATASETS:
        raise DataError(
            f"data.dataset '{cfg.dataset}' holds instruction records; use data.task instruction"
        )
    need_label = cfg.task == "classification"
    if cfg.dataset == "fortunes-sample":
        splits, template = load_split_dir(SAMPLE_DIR, require_label=need_label), FORTUNES_TEMPLATE
    elif cfg.dataset == "fortunes":
        splits, template = (
            build_fortunes_splits(DEFAULT_ROOT, categories=6, seed=seed),
            FORTUNES_TEMPLATE,
        )
    else:
        splits, template = load_split_dir(_folder(cfg), require_label=need_label), GENERIC_TEMPLATE
    for name in ("train", "validation", "test"):
        if not splits.get(name):
            raise DataError(f"data.dataset '{cfg.dataset}' has no examples in its {name} split")
    labels = sorted({ex["label"] for ex in splits["train"]}) if need_label else []
    if need_label:
        for name in ("validation", "test"):
            unseen = sorted({ex["label"] for ex in splits[name]} - set(labels))
            if unseen:
                raise DataError(f"the {name} split has labels absent from train: {unseen[:5]}")
    return DatasetSplits(
        train=splits["train"],
        validation=_cap(splits["validation"], cfg.max_eval_examples),
        test=_cap(splits["test"], cfg.max_eval_examples),
        labels=labels,
        prompt_template=cfg.prompt_template or template,
    )


def task_for(tokenizer: Any, cfg: DataConfig, splits: DatasetSplits) -> Any:
    """The task object (`data.task`) of a job's `data` section over its loaded splits."""
    return make_task(
        tokenizer, cfg.task, splits.labels, splits.prompt_template, cfg.max_length, cfg.instruct
    )
