"""Tests for silotune.data.fortunes: parsing, split building, writing and the committed sample."""

import json
from pathlib import Path

import pytest

from silotune.data.fortunes import (
    DEFAULT_ROOT,
    SAMPLE_CATEGORIES,
    SAMPLE_DIR,
    build_fortunes_splits,
    build_sample,
    read_fortunes,
    sample_meta,
    split_counts,
    write_splits,
)
from silotune.errors import DataError

SPLITS = ("train", "validation", "test")
needs_fortunes = pytest.mark.skipif(
    not DEFAULT_ROOT.is_dir(),
    reason=f"Debian's fortunes package is not installed ({DEFAULT_ROOT} is missing)",
)


def _write_category(root: Path, name: str, entries: list[str]) -> None:
    (root / name).write_text("\n%\n".join(entries) + "\n%\n", encoding="utf-8")


def _fake_root(tmp_path: Path, sizes: dict[str, int]) -> Path:
    root = tmp_path / "fortunes"
    root.mkdir()
    for name, size in sizes.items():
        _write_category(root, name, [f"{name} saying number {i}" for i in range(size)])
    return root


def _load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_read_fortunes_parses_entries_and_skips_index_files(tmp_path):
    root = tmp_path / "fortunes"
    root.mkdir()
    (root / "food").write_text(
        "Eat dessert first.\n%\n  \n%\n  Two\n  lines\n\t\t-- Someone  \n%\n" + "x" * 30 + "\n%\n",
        encoding="utf-8",
    )
    (root / "food.dat").write_bytes(b"\x00\x01binary")
    (root / "food.u8").write_text("not a category\n%\n", encoding="utf-8")
    (root / "off").mkdir()
    (root / "off" / "rude").write_text("hidden\n%\n", encoding="utf-8")
    (root / "art").write_text("A picture.\n%\n", encoding="utf-8")

    result = read_fortunes(root, max_chars=29)

    assert list(result) == ["art", "food"]
    assert result["food"] == ["Eat dessert first.", "Two\n  lines\n\t\t-- Someone"]
    assert result["art"] == ["A picture."]


def test_read_fortunes_missing_root_points_to_apt(tmp_path):
    with pytest.raises(DataError, match="apt-get install fortunes"):
        read_fortunes(tmp_path / "nowhere")


def test_read_fortunes_empty_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no category file"):
        read_fortunes(tmp_path)


def test_splits_take_largest_categories_with_ties_broken_by_name(tmp_path):
    root = _fake_root(tmp_path, {"bb": 30, "aa": 30, "cc": 20, "dd": 50})
    splits = build_fortunes_splits(root, categories=3, test_cap_per_class=None)
    labels = {record["label"] for records in splits.values() for record in records}
    assert labels == {"aa", "bb", "dd"}


def test_splits_are_stratified_with_floor_sizes_and_test_cap(tmp_path):
    root = _fake_root(tmp_path, {"aa": 95, "bb": 41})
    splits = build_fortunes_splits(root, categories=2, fractions=(0.8, 0.1, 0.1))
    assert split_counts(splits) == {
        "train": {"aa": 76, "bb": 32},
        "validation": {"aa": 9, "bb": 4},
        "test": {"aa": 10, "bb": 5},
    }
    capped = build_fortunes_splits(root, categories=2, test_cap_per_class=6)
    assert split_counts(capped)["test"] == {"aa": 6, "bb": 5}
    assert split_counts(capped)["train"] == {"aa": 76, "bb": 32}


def test_max_per_class_limits_before_splitting(tmp_path):
    root = _fake_root(tmp_path, {"aa": 95, "bb": 41})
    splits = build_fortunes_splits(
        root, categories=["aa", "bb"], fractions=(5 / 7, 1 / 7, 1 / 7), max_per_class=35
    )
    for split, expected in zip(SPLITS, (25, 5, 5), strict=True):
        assert split_counts(splits)[split] == {"aa": expected, "bb": expected}


def test_duplicates_never_cross_splits_and_shared_texts_are_dropped(tmp_path):
    root = tmp_path / "fortunes"
    root.mkdir()
    aa = [f"alpha {i}" for i in range(40)] + ["shared   text"] + ["alpha 3"] * 5
    bb = [f"beta {i}" for i in range(40)] + ["shared text"]
    _write_category(root, "aa", aa)
    _write_category(root, "bb", bb)

    splits = build_fortunes_splits(root, categories=2, test_cap_per_class=None)

    texts = [record["text"] for records in splits.values() for record in records]
    assert len(texts) == len(set(texts)) == 80
    assert not any("shared" in text for text in texts)


def test_splits_are_deterministic_by_seed(tmp_path):
    root = _fake_root(tmp_path, {"aa": 60, "bb": 60})
    first = build_fortunes_splits(root, categories=2, seed=3)
    assert build_fortunes_splits(root, categories=2, seed=3) == first
    assert build_fortunes_splits(root, categories=2, seed=4) != first


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fractions": (0.8, 0.3, 0.1)}, "summing to 1"),
        ({"fractions": (0.5, 0.5)}, "three non-negative"),
        ({"categories": ["aa", "zz"]}, "Unknown fortune categories"),
        ({"categories": 7}, "between 2 and 2"),
        ({"categories": ["aa", "aa"]}, "at least 2 distinct"),
    ],
)
def test_bad_arguments_raise_data_error(tmp_path, kwargs, message):
    root = _fake_root(tmp_path, {"aa": 10, "bb": 10})
    with pytest.raises(DataError, match=message):
        build_fortunes_splits(root, **kwargs)


def test_write_splits_round_trips_and_refuses_to_overwrite(tmp_path):
    splits = {
        "train": [{"text": "Ünïcode fortune\n\t-- me", "label": "aa"}],
        "validation": [{"text": "b", "label": "bb"}],
        "test": [{"text": "c", "label": "aa"}, {"text": "d", "label": "bb"}],
    }
    out = tmp_path / "out"
    write_splits(splits, out, meta={"seed": 0, "categories": ["aa", "bb"]})

    for split in SPLITS:
        assert _load_jsonl(out / f"{split}.jsonl") == splits[split]
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["seed"] == 0
    assert meta["counts"]["test"] == {"aa": 1, "bb": 1}

    with pytest.raises(DataError, match="not empty"):
        write_splits(splits, out)
    write_splits({"train": [{"text": "new", "label": "aa"}]}, out, overwrite=True)
    assert _load_jsonl(out / "train.jsonl") == [{"text": "new", "label": "aa"}]


def test_write_splits_rejects_unknown_split_name(tmp_path):
    with pytest.raises(DataError, match="allowed: train, validation, test"):
        write_splits({"dev": []}, tmp_path / "out")


def test_committed_sample_is_balanced_short_and_disjoint():
    sample = {split: _load_jsonl(SAMPLE_DIR / f"{split}.jsonl") for split in SPLITS}
    counts = split_counts(sample)
    for split, per_class in zip(SPLITS, (100, 20, 20), strict=True):
        assert counts[split] == {name: per_class for name in SAMPLE_CATEGORIES}
    texts = [record["text"] for records in sample.values() for record in records]
    assert len(set(texts)) == len(texts) == 560
    assert max(len(text) for text in texts) <= 200
    assert all(
        set(record) == {"text", "label"} for records in sample.values() for record in records
    )

    meta = json.loads((SAMPLE_DIR / "meta.json").read_text(encoding="utf-8"))
    assert meta == {**sample_meta(), "counts": counts}


@needs_fortunes
def test_build_sample_regenerates_the_committed_sample():
    sample = build_sample(DEFAULT_ROOT)
    for split in SPLITS:
        assert sample[split] == _load_jsonl(SAMPLE_DIR / f"{split}.jsonl"), split


@needs_fortunes
def test_real_corpus_matches_field_notes_counts():
    corpus = read_fortunes(DEFAULT_ROOT, max_chars=600)
    largest = sorted(corpus, key=lambda name: (-len(corpus[name]), name))[:6]
    assert {name: len(corpus[name]) for name in largest} == {
        "computers": 941,
        "cookie": 1049,
        "definitions": 1182,
        "miscellaneous": 645,
        "people": 1224,
        "politics": 679,
    }


@needs_fortunes
def test_real_six_class_task_has_disjoint_splits_and_capped_test():
    splits = build_fortunes_splits(DEFAULT_ROOT)
    counts = split_counts(splits)
    assert sorted(counts["test"]) == [
        "computers",
        "cookie",
        "definitions",
        "miscellaneous",
        "people",
        "politics",
    ]
    assert max(counts["test"].values()) == 100
    seen = [{record["text"] for record in records} for records in splits.values()]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
