"""Read instruction records (instruction/input/output or chat messages) and multiple-choice records.

Every record comes back in one shape, ``{"messages": [{"role", "content"}, ...], "domain": str}``
whose last message is the assistant's response; ``domain`` is ``""`` when the file has none. A bad
record raises one :class:`DataError` naming the file and its line (JSONL) or row (CSV, Parquet).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from silotune.data.files import BUILDERS, SPLIT_NAMES, find_split_files, read_rows
from silotune.errors import DataError

ROLES = ("system", "user", "assistant")
MC_FILE = "multiple_choice.jsonl"
LETTERS = "ABCDEFGHIJ"


def _as_text(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        for k, v in row.items()
    }


def _rows(path: Path) -> list[tuple[str, Any]]:
    """``(where, row)`` pairs: JSONL read line by line so errors name the line.

    A CSV reader types a cell of digits as a number; such cells are turned back into text.
    """
    if path.suffix.lower() != ".jsonl":
        return [(f"row {i}", _as_text(row)) for i, row in enumerate(read_rows(path), start=1)]
    if not path.is_file():
        raise DataError(f"Data file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason}).") from exc
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number}: not valid JSON ({exc.msg}).") from exc
    if not rows:
        raise DataError(f"Data file {path} is empty.")
    return rows


def _text(path: Path, where: str, row: dict, key: str, required: bool) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{path} {where}: '{key}' must be a string, it is {got}.")
    if required and not value.strip():
        raise DataError(f"{path} {where}: '{key}' is empty.")
    return value


def _messages(path: Path, where: str, value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):  # a CSV cell holding JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} {where}: 'messages' is not a JSON list ({exc.msg}).") from exc
    if not isinstance(value, list) or len(value) < 2:
        raise DataError(f"{path} {where}: 'messages' must be a list of at least 2 messages.")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DataError(f"{path} {where}: message {i} needs a 'role' among {', '.join(ROLES)}.")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{path} {where}: message {i} needs a string 'content'.")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise DataError(
            f"{path} {where}: the last message must be the assistant's response, not empty."
        )
    return messages


def to_messages(path: Path, where: str, row: Any) -> dict[str, Any]:
    """One file row -> ``{"messages", "domain"}``; raises DataError naming `path` and `where`."""
    if not isinstance(row, dict):
        raise DataError(f"{path} {where}: expected an object, got {type(row).__name__}.")
    domain = row.get("domain")
    domain = "" if domain is None else str(domain)
    if row.get("messages") is not None:
        return {"messages": _messages(path, where, row["messages"]), "domain": domain}
    if "instruction" not in row and "output" not in row:
        raise DataError(
            f"{path} {where}: a record needs 'instruction' and 'output' (optional 'input'), or "
            f"'messages'; it has {sorted(row)}."
        )
    instruction = _text(path, where, row, "instruction", required=True)
    extra = _text(path, where, row, "input", required=False)
    output = _text(path, where, row, "output", required=True)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": messages, "domain": domain}


def load_instruction_file(path: Path) -> list[dict[str, Any]]:
    """All records of one split file (JSONL, JSON, CSV or Parquet), see the module docstring."""
    path = Path(path)
    if path.suffix.lower() not in BUILDERS:
        raise DataError(f"{path} has an unsupported extension; allowed: {', '.join(BUILDERS)}.")
    return [to_messages(path, where, row) for where, row in _rows(path)]


def load_instruction_dir(directory: Path) -> dict[str, list[dict[str, Any]]]:
    """The train (required), validation and test files of a folder, as records."""
    files = find_split_files(Path(directory))
    if "train" not in files:
        raise DataError(f"Data folder {directory} has no train file (train.jsonl, .csv, ...).")
    return {name: load_instruction_file(files[name]) for name in SPLIT_NAMES if name in files}


def load_multiple_choice(path: Path) -> list[dict[str, Any]]:
    """MMLU-style records ``{"question", "choices": [2..10 str], "answer": letter}`` (+ domain)."""
    records = []
    for where, row in _rows(Path(path)):
        if not isinstance(row, dict):
            raise DataError(f"{path} {where}: expected an object, got {type(row).__name__}.")
        question = _text(path, where, row, "question", required=True)
        choices = row.get("choices")
        if (
            not isinstance(choices, list)
            or not 2 <= len(choices) <= len(LETTERS)
            or not all(isinstance(c, str) and c.strip() for c in choices)
        ):
            raise DataError(
                f"{path} {where}: 'choices' must be a list of 2 to {len(LETTERS)} non-empty strings."
            )
        answer = row.get("answer")
        allowed = LETTERS[: len(choices)]
        if not isinstance(answer, str) or answer.strip().upper() not in allowed:
            raise DataError(
                f"{path} {where}: 'answer' must be one of the letters {', '.join(allowed)}, "
                f"got {answer!r}."
            )
        records.append(
            {
                "question": question,
                "choices": list(choices),
                "answer": answer.strip().upper(),
                "domain": "" if row.get("domain") is None else str(row["domain"]),
            }
        )
    return records
