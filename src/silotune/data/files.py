"""Load local split files (JSONL, JSON, CSV, Parquet) into plain record lists, with clear errors."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from silotune.errors import DataError

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "validation", "test")
# file suffix -> `datasets` packaged builder; all of them read local files without the Hub
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ALLOWED = ", ".join(BUILDERS)


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hide `datasets`' per-file progress bars, restoring the caller's setting afterwards."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _check_utf8(path: Path, raw: bytes) -> None:
    """Reject text files that are not UTF-8 (pyarrow would read them and fail much later)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path} line {line} is not UTF-8 text ({exc.reason}).") from exc


def _locate_json_error(path: Path) -> str | None:
    """Describe the first malformed spot of a JSON/JSONL file ('line N: why'), or None."""
    text = path.read_text(encoding="utf-8", errors="replace")  # UTF-8 was checked before
    if path.suffix.lower() == ".json":
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            return f"line {exc.lineno}: {exc.msg}"
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {number}: {exc.msg}"
        if not isinstance(value, dict):
            return f"line {number}: expected a JSON object, got {type(value).__name__}"
    return None


def _read_table(path: Path) -> Any:
    """Read `path` with the matching `datasets` builder; return a `datasets.Dataset`."""
    import datasets

    # A private, throw-away cache: private silo data is not copied into the shared
    # ~/.cache/huggingface, and a stale cache entry can never shadow an edited file.
    # Packaged builders ("json", "csv", "parquet") with local data_files never reach the network.
    with tempfile.TemporaryDirectory(prefix="silotune-data-") as cache_dir:
        return datasets.load_dataset(
            BUILDERS[path.suffix.lower()],
            data_files=str(path),
            split="train",
            cache_dir=cache_dir,
            keep_in_memory=True,
        )


def _read_error(path: Path, exc: BaseException) -> DataError:
    """Turn a `datasets` parser failure into one clear sentence (with a line number for JSON)."""
    where = _locate_json_error(path) if BUILDERS[path.suffix.lower()] == "json" else None
    if where is not None:
        return DataError(f"{path} {where}; it is not valid JSON.")
    # datasets wraps the parser's error ("An error occurred while generating the dataset"):
    # the innermost cause names the actual problem
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else type(exc).__name__
    return DataError(f"{path} could not be read as a {path.suffix} table: {reason}")


def _records(path: Path, dataset: Any, require_label: bool) -> list[dict[str, str]]:
    """Validate columns and cell types and return ``{"text", "label"?}`` records."""
    columns = list(dataset.column_names)
    if "text" not in columns:
        raise DataError(f"{path} has no 'text' column; its columns are {columns}.")
    has_label = "label" in columns
    if require_label and not has_label:
        raise DataError(
            f"{path} has no 'label' column, which classification needs; its columns are {columns}."
        )
    texts = list(dataset["text"])
    labels = list(dataset["label"]) if has_label else None
    records: list[dict[str, str]] = []
    for row, text in enumerate(texts, start=1):
        if not isinstance(text, str):
            raise DataError(
                f"{path} row {row}: 'text' must be a string, got {type(text).__name__} ({text!r})."
            )
        record = {"text": text}
        if labels is not None:
            label = labels[row - 1]
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise DataError(
                    f"{path} row {row}: 'label' must be a string or an integer, "
                    f"got {type(label).__name__} ({label!r})."
                )
            record["label"] = str(label)
        records.append(record)
    return records


def _checked_table(path: Path) -> Any:
    """The rows of `path` as a datasets table; DataError if missing, empty, non-UTF-8 or bad."""
    if path.suffix.lower() not in BUILDERS:
        raise DataError(f"{path} has an unsupported extension; allowed extensions: {ALLOWED}.")
    if not path.is_file():
        raise DataError(f"Data file {path} does not exist.")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"Data file {path} is empty.")
    if BUILDERS[path.suffix.lower()] != "parquet":
        _check_utf8(path, raw)
    with _quiet_progress_bars():
        try:
            dataset = _read_table(path)
        except Exception as exc:  # datasets wraps parser errors in several exception types
            raise _read_error(path, exc) from exc
    return dataset


def load_split_file(path: Path, require_label: bool = True) -> list[dict[str, str]]:
    """Load one split file into a list of ``{"text": str, "label": str}`` records.

    Parameters
    ----------
    path : Path
        A ``.jsonl``, ``.json`` (a list of objects), ``.csv`` (with a header) or ``.parquet``
        file with a ``text`` column and, for classification, a ``label`` column.
    require_label : bool
        Require a ``label`` column (classification). When False (language modelling) the
        ``label`` key is still returned where the file has one.

    Returns
    -------
    list[dict[str, str]]
        Records in file order. Integer labels are turned into strings; other columns are
        dropped.

    Raises
    ------
    DataError
        If the file is missing, empty, has an unknown extension, is malformed (JSON errors name
        the line), lacks a required column, or holds a cell of the wrong type.
    """
    path = Path(path)
    records = _records(path, _checked_table(path), require_label)
    logger.debug("loaded %d records from %s", len(records), path)
    return records


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a JSON, CSV or Parquet file as a dict (instruction data: any columns).

    Raises DataError for a missing, empty, non-UTF-8 or malformed file, like `load_split_file`.
    """
    return [dict(row) for row in _checked_table(Path(path))]


def find_split_files(directory: Path) -> dict[str, Path]:
    """Map each split name found in `directory` to its file (``<split>.<ext>``, one per split)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"Data folder {directory} does not exist.")
    found: dict[str, Path] = {}
    for split in SPLIT_NAMES:
        matches = [directory / f"{split}{ext}" for ext in BUILDERS]
        matches = [path for path in matches if path.is_file()]
        if len(matches) > 1:
            names = ", ".join(path.name for path in matches)
            raise DataError(
                f"Data folder {directory} has several files for split '{split}' ({names}); "
                "keep exactly one."
            )
        if matches:
            found[split] = matches[0]
    return found


def load_split_dir(
    directory: Path,
    require_label: bool = True,
    required: Sequence[str] = ("train",),
) -> dict[str, list[dict[str, str]]]:
    """Load the train/validation/test files of a folder, each in any supported format.

    Parameters
    ----------
    directory : Path
        Folder holding ``train.<ext>``, ``validation.<ext>`` and ``test.<ext>``, where
        ``<ext>`` is one of jsonl, json, csv, parquet.
    require_label : bool
        Passed to `load_split_file`.
    required : sequence of str
        Splits that must be present; the others are loaded when present.

    Returns
    -------
    dict[str, list[dict[str, str]]]
        Split name -> records, in the order train, validation, test, present splits only.

    Raises
    ------
    DataError
        If the folder or a required split is missing, a split has two files, or a file is
        invalid (see `load_split_file`).
    """
    unknown = [name for name in required if name not in SPLIT_NAMES]
    if unknown:
        raise DataError(f"Unknown split names {unknown}; allowed: {', '.join(SPLIT_NAMES)}.")
    files = find_split_files(directory)
    missing = [name for name in required if name not in files]
    if missing:
        raise DataError(
            f"Data folder {directory} has no file for split(s) {', '.join(missing)}; expected "
            f"<split>.<ext> with <ext> one of {ALLOWED}."
        )
    return {split: load_split_file(path, require_label) for split, path in files.items()}
