"""Resolve `data.dataset` (a bundled name or a local folder) into train/validation/test examples."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from silotune.config import DataConfig
from silotune.data.files import load_split_dir
from silotune.data.fortunes import DEFAULT_ROOT, SAMPLE_DIR, build_fortunes_splits
from silotune.errors import DataError

NAMED = {
    "fortunes-sample": "bundled sample of Debian fortunes (4 categories, no apt needed)",
    "fortunes": "Debian fortunes, 6 largest categories, 80/10/10 split (apt-get install fortunes)",
}
FORTUNES_TEMPLATE = "Fortune: {text}\nCategory:"
GENERIC_TEMPLATE = "{text}\nLabel:"


@dataclass
class DatasetSplits:
    """Examples per split plus what the task needs to know about them."""

    train: list[dict]
    validation: list[dict]
    test: list[dict]
    labels: list[str]  # sorted label set of the training split ([] for LM)
    prompt_template: str


def _cap(examples: list[dict], cap: int | None) -> list[dict]:
    """A fixed, order-preserving random subset (files are often sorted by label, so no head slice)."""
    if cap is None or len(examples) <= cap:
        return examples
    keep = sorted(random.Random(0).sample(range(len(examples)), cap))
    return [examples[i] for i in keep]


def load_splits(cfg: DataConfig, seed: int = 0) -> DatasetSplits:
    """Load the dataset named in `cfg` and check it fits the task."""
    need_label = cfg.task == "classification"
    if cfg.dataset == "fortunes-sample":
        splits, template = load_split_dir(SAMPLE_DIR, require_label=need_label), FORTUNES_TEMPLATE
    elif cfg.dataset == "fortunes":
        splits, template = (
            build_fortunes_splits(DEFAULT_ROOT, categories=6, seed=seed),
            FORTUNES_TEMPLATE,
        )
    else:
        path = Path(cfg.dataset).expanduser()
        if not path.is_dir():
            raise DataError(
                f"data.dataset '{cfg.dataset}' is neither a bundled dataset ({', '.join(NAMED)}) nor "
                "a folder holding train/validation/test files"
            )
        splits, template = load_split_dir(path, require_label=need_label), GENERIC_TEMPLATE
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
