"""Text-classification splits built from Debian's `fortunes` package, and the committed sample.

The corpus is read from ``/usr/share/games/fortunes/<category>`` (install it with
``apt-get install fortunes``); each file holds entries separated by a line holding only ``%``.
The texts come from the Debian ``fortunes`` package (source ``fortune-mod``, BSD licence, see
``/usr/share/doc/fortunes/copyright``); each quotation stays attributed to its author.

The sample committed under ``silotune/data/sample`` ("fortunes-sample", 560 examples) is exactly::

    build_fortunes_splits(
        root, categories=("food", "linux", "politics", "startrek"), seed=0,
        fractions=(5 / 7, 1 / 7, 1 / 7), test_cap_per_class=None, max_per_class=140,
        max_chars=200,
    )

that is 100 train + 20 validation + 20 test entries of at most 200 characters per category.
The four categories were chosen because a bag-of-words naive Bayes model trained on the 100
train entries per class already tells them apart (72.5% on its test split, chance 25%),
while the label names stay meaningful to a pretrained model. `build_sample` regenerates it.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from silotune.errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/usr/share/games/fortunes")
SPLITS = ("train", "validation", "test")
SOURCE = "Debian package 'fortunes' (fortune-mod, BSD licence), /usr/share/games/fortunes"

SAMPLE_DIR = Path(__file__).parent / "sample"
SAMPLE_CATEGORIES = ("food", "linux", "politics", "startrek")
SAMPLE_SEED = 0
SAMPLE_CALL = (
    "build_fortunes_splits(root, categories=('food', 'linux', 'politics', 'startrek'), seed=0, "
    "fractions=(5 / 7, 1 / 7, 1 / 7), test_cap_per_class=None, max_per_class=140, max_chars=200)"
)

_SKIPPED_SUFFIXES = (".dat", ".u8")


def _parse_entries(text: str) -> list[str]:
    """Split one fortune file into stripped entries (a line holding only ``%`` ends an entry)."""
    entries: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current).strip())
    return [entry for entry in entries if entry]


def read_fortunes(root: Path = DEFAULT_ROOT, max_chars: int = 600) -> dict[str, list[str]]:
    """Read every fortune category under `root`.

    Parameters
    ----------
    root : Path
        Folder holding one file per category (``*.dat``, ``*.u8`` and subfolders are skipped).
    max_chars : int
        Entries longer than this (after stripping) are dropped.

    Returns
    -------
    dict[str, list[str]]
        Category name -> entries in file order; categories sorted by name. Empty entries are
        dropped; categories left with no entry are omitted.

    Raises
    ------
    DataError
        If `root` is not a folder or holds no category file.
    """
    root = Path(root)
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}.")
    if not root.is_dir():
        raise DataError(
            f"Fortune folder {root} does not exist; install Debian's fortunes with "
            "'apt-get install fortunes' or pass the folder that holds the category files."
        )
    categories: dict[str, list[str]] = {}
    for path in sorted(root.iterdir()):
        if not path.is_file() or path.name.endswith(_SKIPPED_SUFFIXES):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"Fortune file {path} is not valid UTF-8 ({exc.reason}).") from exc
        entries = [entry for entry in _parse_entries(text) if len(entry) <= max_chars]
        if entries:
            categories[path.name] = entries
    if not categories:
        raise DataError(
            f"Fortune folder {root} holds no category file; expected files such as "
            "'computers' or 'people' as installed by 'apt-get install fortunes'."
        )
    return categories


def _dedup_key(text: str) -> str:
    """Whitespace-normalised form used to detect the same quotation written twice."""
    return " ".join(text.split())


def _choose_categories(
    available: Mapping[str, list[str]], categories: int | Sequence[str]
) -> list[str]:
    """Resolve `categories` (a count of largest categories, or names) to sorted names."""
    if isinstance(categories, int):
        if categories < 2 or categories > len(available):
            raise DataError(
                f"categories={categories} is out of range; choose between 2 and "
                f"{len(available)} (the number of fortune categories found)."
            )
        ranked = sorted(available, key=lambda name: (-len(available[name]), name))
        return sorted(ranked[:categories])
    names = list(categories)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise DataError(
            f"Unknown fortune categories {unknown}; available: {', '.join(sorted(available))}."
        )
    if len(set(names)) != len(names) or len(names) < 2:
        raise DataError(f"categories must name at least 2 distinct categories, got {names}.")
    return sorted(names)


def _unique_texts(chosen: Sequence[str], corpus: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Keep each text once per category and drop texts found in more than one chosen category."""
    owners: dict[str, set[str]] = {}
    for name in chosen:
        for text in corpus[name]:
            owners.setdefault(_dedup_key(text), set()).add(name)
    result: dict[str, list[str]] = {}
    for name in chosen:
        seen: set[str] = set()
        kept: list[str] = []
        for text in corpus[name]:
            key = _dedup_key(text)
            if key in seen or len(owners[key]) > 1:
                continue
            seen.add(key)
            kept.append(text)
        dropped = len(corpus[name]) - len(kept)
        if dropped:
            logger.info("fortunes: dropped %d duplicate texts from %s", dropped, name)
        result[name] = kept
    return result


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate (train, validation, test) fractions: three non-negative numbers summing to 1."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(
            f"fractions must be three non-negative numbers (train, validation, test) "
            f"summing to 1, got {tuple(fractions)}."
        )
    return float(fractions[0]), float(fractions[1]), float(fractions[2])


def build_fortunes_splits(
    root: Path = DEFAULT_ROOT,
    categories: int | Sequence[str] = 6,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    test_cap_per_class: int | None = 100,
    max_per_class: int | None = None,
    max_chars: int = 600,
) -> dict[str, list[dict[str, str]]]:
    """Build stratified train/validation/test splits of fortune-category classification.

    Parameters
    ----------
    root : Path
        Fortune folder, see `read_fortunes`.
    categories : int or sequence of str
        Either how many of the largest categories to use (ties broken by name) or their names.
    seed : int
        Seed of the deterministic shuffle (``random.Random``; not security relevant).
    fractions : sequence of float
        (train, validation, test) fractions per class; train and validation sizes are rounded
        down and test takes the rest.
    test_cap_per_class : int or None
        At most this many test examples per class (the surplus is discarded, not moved).
    max_per_class : int or None
        Use at most this many (shuffled) entries per class before splitting.
    max_chars : int
        Entries longer than this are dropped, see `read_fortunes`.

    Returns
    -------
    dict[str, list[dict[str, str]]]
        ``{"train": [...], "validation": [...], "test": [...]}`` of ``{"text", "label"}``
        records, the label being the category name; each split is shuffled.

    Notes
    -----
    A text (compared with whitespace normalised) is kept once per category, and a text found in
    more than one chosen category is dropped, so no text appears in two splits.
    """
    f_train, f_val, _ = _check_fractions(fractions)
    if test_cap_per_class is not None and test_cap_per_class < 0:
        raise DataError(f"test_cap_per_class must be >= 0 or None, got {test_cap_per_class}.")
    if max_per_class is not None and max_per_class < 1:
        raise DataError(f"max_per_class must be >= 1 or None, got {max_per_class}.")
    corpus = read_fortunes(root, max_chars=max_chars)
    chosen = _choose_categories(corpus, categories)
    texts = _unique_texts(chosen, corpus)

    rng = random.Random(seed)
    splits: dict[str, list[dict[str, str]]] = {name: [] for name in SPLITS}
    for label in chosen:  # sorted, so the random stream is consumed in a fixed order
        entries = list(texts[label])
        rng.shuffle(entries)
        if max_per_class is not None:
            entries = entries[:max_per_class]
        # the epsilon keeps e.g. 140 * 5/7 = 99.999... from rounding down to 99
        n_train = int(len(entries) * f_train + 1e-9)
        n_val = int(len(entries) * f_val + 1e-9)
        test = entries[n_train + n_val :]
        if test_cap_per_class is not None:
            test = test[:test_cap_per_class]
        parts = {
            "train": entries[:n_train],
            "validation": entries[n_train : n_train + n_val],
            "test": test,
        }
        for split, part in parts.items():
            splits[split].extend({"text": text, "label": label} for text in part)
    for records in splits.values():
        rng.shuffle(records)
    logger.info(
        "fortunes: %s -> %s",
        ", ".join(chosen),
        ", ".join(f"{name} {len(records)}" for name, records in splits.items()),
    )
    return splits


def split_counts(splits: Mapping[str, Sequence[Mapping[str, str]]]) -> dict[str, dict[str, int]]:
    """Count examples per label in every split: ``{split: {label: n}}`` with sorted labels."""
    counts: dict[str, dict[str, int]] = {}
    for split, records in splits.items():
        counter = Counter(str(record.get("label")) for record in records)
        counts[split] = dict(sorted(counter.items()))
    return counts


def write_splits(
    splits: Mapping[str, Sequence[Mapping[str, str]]],
    out_dir: Path,
    meta: Mapping[str, object] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``<split>.jsonl`` files (UTF-8, one JSON object a line) and a ``meta.json``.

    Parameters
    ----------
    splits : mapping of str to sequence of records
        Split name (one of train, validation, test) -> records.
    out_dir : Path
        Destination folder; created if needed.
    meta : mapping or None
        Extra provenance (categories, seed, source, ...) stored in ``meta.json`` next to the
        per-split, per-label counts, which are always written.
    overwrite : bool
        Allow writing into a folder that is not empty.

    Returns
    -------
    Path
        `out_dir`.

    Raises
    ------
    DataError
        If `out_dir` exists and is not empty while `overwrite` is False, or a split name is
        not one of train, validation, test.
    """
    out_dir = Path(out_dir)
    unknown = [name for name in splits if name not in SPLITS]
    if unknown:
        raise DataError(f"Unknown split names {unknown}; allowed: {', '.join(SPLITS)}.")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"Output path {out_dir} exists and is not a folder.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(
            f"Output folder {out_dir} is not empty; choose another folder or pass overwrite=True."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        lines = [json.dumps(dict(record), ensure_ascii=False) + "\n" for record in records]
        (out_dir / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8")
    info: dict[str, object] = dict(meta or {})
    info["counts"] = split_counts(splits)
    (out_dir / "meta.json").write_text(
        json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return out_dir


def build_sample(root: Path = DEFAULT_ROOT) -> dict[str, list[dict[str, str]]]:
    """Rebuild the committed "fortunes-sample" splits exactly (the call is `SAMPLE_CALL`)."""
    return build_fortunes_splits(
        root,
        categories=SAMPLE_CATEGORIES,
        seed=SAMPLE_SEED,
        fractions=(5 / 7, 1 / 7, 1 / 7),
        test_cap_per_class=None,
        max_per_class=140,
        max_chars=200,
    )


def sample_meta() -> dict[str, object]:
    """Provenance of the committed sample as stored in its ``meta.json`` (without counts)."""
    return {
        "name": "fortunes-sample",
        "source": SOURCE,
        "license": "BSD (fortune-mod); quotations remain attributed to their authors",
        "categories": list(SAMPLE_CATEGORIES),
        "seed": SAMPLE_SEED,
        "builder": f"silotune.data.fortunes.{SAMPLE_CALL}",
    }
