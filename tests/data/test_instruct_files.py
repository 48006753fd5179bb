"""Tests for silotune.data.instruct_files: record shapes, and one clear error per bad record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from silotune.data.instruct_files import (
    load_instruction_dir,
    load_instruction_file,
    load_multiple_choice,
)
from silotune.errors import DataError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_instruction_input_output_become_two_messages(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"instruction": "Translate.", "input": "chat", "output": "cat", "domain": "fr"},
            {"instruction": "Say hi.", "output": "hi"},
        ],
    )
    records = load_instruction_file(path)
    assert records[0] == {
        "messages": [
            {"role": "user", "content": "Translate.\n\nchat"},
            {"role": "assistant", "content": "cat"},
        ],
        "domain": "fr",
    }
    assert records[1]["messages"][0]["content"] == "Say hi." and records[1]["domain"] == ""


def test_messages_records_and_csv(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": messages}])
    assert load_instruction_file(path)[0]["messages"] == messages
    csv = tmp_path / "other.csv"
    csv.write_text("instruction,input,output\nAdd.,1 2,3\n", encoding="utf-8")
    assert load_instruction_file(csv)[0]["messages"][1] == {"role": "assistant", "content": "3"}


BAD = [
    pytest.param('{"instruction": "a", "output": "b"}\n{"instruction": "a",\n', "line 2", "not valid JSON", id="bad-json"),
    pytest.param('{"instruction": "a"}\n', "line 1", "'output' must be a string, it is missing", id="no-output"),
    pytest.param('{"instruction": "a", "output": "  "}\n', "line 1", "'output' is empty", id="empty-output"),
    pytest.param('{"text": "a"}\n', "line 1", "needs 'instruction' and 'output'", id="wrong-shape"),
    pytest.param('\n\n{"instruction": 3, "output": "b"}\n', "line 3", "'instruction' must be a string", id="not-string"),
    pytest.param('[1, 2]\n', "line 1", "expected an object", id="not-object"),
    pytest.param('{"messages": [{"role": "user", "content": "a"}]}\n', "line 1", "at least 2 messages", id="one-message"),
    pytest.param('{"messages": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}]}\n', "line 1", "message 0 needs a 'role'", id="bad-role"),
    pytest.param('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}\n', "line 1", "last message must be the assistant", id="no-response"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "where", "why"), BAD)
def test_a_bad_record_names_the_file_and_line(
    tmp_path: Path, text: str, where: str, why: str
) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_instruction_file(path)
    message = str(info.value)
    assert str(path) in message and where in message and why in message
    assert "\n" not in message


def test_csv_errors_name_the_row(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("instruction,output\na,b\nc,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train.csv row 2: 'output' must be a string"):
        load_instruction_file(path)


def test_folder_needs_a_train_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "test.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match="has no train file"):
        load_instruction_dir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", [{"instruction": "a", "output": "b"}])
    assert sorted(load_instruction_dir(tmp_path)) == ["test", "train"]


def test_multiple_choice_records(tmp_path: Path) -> None:
    good = {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": "b", "domain": "math"}
    path = write_jsonl(tmp_path / "mc.jsonl", [good])
    assert load_multiple_choice(path) == [{**good, "answer": "B"}]
    for bad, why in [
        ({**good, "answer": "E"}, "one of the letters A, B, C, D"),
        ({**good, "choices": ["only"]}, "list of 2 to 10 non-empty strings"),
        ({**good, "question": ""}, "'question' is empty"),
    ]:
        write_jsonl(path, [good, bad])
        with pytest.raises(DataError, match=f"mc.jsonl line 2: .*{why}"):
            load_multiple_choice(path)
