"""Tests for silotune.data.registry: the bundled sample, local folders, caps and clear DataErrors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from silotune.config import DataConfig
from silotune.data.registry import FORTUNES_TEMPLATE, GENERIC_TEMPLATE, load_splits
from silotune.errors import DataError


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_folder(root: Path, splits: dict[str, list[dict]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write_jsonl(root / f"{name}.jsonl", rows)
    return root


ROWS = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(6)]


def test_bundled_sample() -> None:
    splits = load_splits(DataConfig())
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (400, 80, 80)
    assert splits.labels == ["food", "linux", "politics", "startrek"]
    assert splits.prompt_template == FORTUNES_TEMPLATE
    assert all(set(ex) == {"text", "label"} for ex in splits.train)


def test_max_eval_examples_caps_evaluation_only_with_a_fixed_spread_subset() -> None:
    full = load_splits(DataConfig())
    capped = load_splits(DataConfig(max_eval_examples=12))
    again = load_splits(DataConfig(max_eval_examples=12))
    assert len(capped.train) == 400
    assert len(capped.validation) == len(capped.test) == 12
    assert capped.test == again.test  # the same subset every time
    positions = [full.test.index(ex) for ex in capped.test]
    assert positions == sorted(positions)  # file order kept
    assert len({ex["label"] for ex in capped.test}) > 1  # not a head slice of a sorted file


def test_local_folder_uses_the_generic_template_unless_one_is_given(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "d", {"train": ROWS, "validation": ROWS[:2], "test": ROWS[2:]})
    splits = load_splits(DataConfig(dataset=str(folder)))
    assert splits.labels == ["a", "b"] and splits.prompt_template == GENERIC_TEMPLATE
    assert [ex["text"] for ex in splits.test] == ["t2", "t3", "t4", "t5"]
    custom = load_splits(DataConfig(dataset=str(folder), prompt_template="Q {text} A"))
    assert custom.prompt_template == "Q {text} A"


def test_lm_needs_no_labels(tmp_path: Path) -> None:
    rows = [{"text": f"line {i}"} for i in range(3)]
    folder = make_folder(tmp_path / "lm", {"train": rows, "validation": rows, "test": rows})
    splits = load_splits(DataConfig(dataset=str(folder), task="lm"))
    assert splits.labels == [] and len(splits.train) == 3
    with pytest.raises(DataError, match="no 'label' column"):
        load_splits(DataConfig(dataset=str(folder), task="classification"))


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        ({"train": ROWS, "test": ROWS}, "no examples in its validation split"),
        ({"validation": ROWS, "test": ROWS}, "no file for split(s) train"),
        (
            {"train": ROWS, "validation": ROWS, "test": [{"text": "x", "label": "c"}]},
            "the test split has labels absent from train: ['c']",
        ),
    ],
    ids=["no-validation", "no-train", "unseen-label"],
)
def test_incomplete_folders_are_data_errors(tmp_path: Path, splits: dict, message: str) -> None:
    folder = make_folder(tmp_path / "d", splits)
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(dataset=str(folder)))
    assert message in str(info.value)


def test_missing_folder_or_a_file_instead_of_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="neither a bundled dataset .*fortunes-sample"):
        load_splits(DataConfig(dataset=str(tmp_path / "absent")))
    file = tmp_path / "train.jsonl"
    write_jsonl(file, ROWS)
    with pytest.raises(DataError, match="folder holding train/validation/test files"):
        load_splits(DataConfig(dataset=str(file)))
