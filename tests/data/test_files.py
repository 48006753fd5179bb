"""Tests for silotune.data.files: every supported format, folder discovery and error messages."""

import json
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from silotune.data.files import load_split_dir, load_split_file
from silotune.errors import DataError

RECORDS = [
    {"text": "Eat dessert first.", "label": "food"},
    {"text": "Beam me up, Scotty.\n\t\t-- Kirk", "label": "startrek"},
    {"text": 'Quotes "inside", and a comma', "label": "food"},
]


def _write(path: Path, records: list[dict], columns: tuple[str, ...] = ("text", "label")) -> Path:
    rows = [{key: record[key] for key in columns} for record in records]
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    elif suffix == ".csv":
        pacsv.write_csv(pa.Table.from_pylist(rows), path)
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loading a local data file tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_format_loads_the_same_records_offline(tmp_path, suffix, no_network):
    path = _write(tmp_path / f"train{suffix}", RECORDS)
    assert load_split_file(path) == RECORDS


def test_language_modelling_files_need_only_text(tmp_path):
    path = _write(tmp_path / "train.jsonl", RECORDS, columns=("text",))
    assert load_split_file(path, require_label=False) == [{"text": r["text"]} for r in RECORDS]


def test_extra_columns_are_dropped_and_integer_labels_become_strings(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("id,text,label\n7,hello,0\n8,world,1\n", encoding="utf-8")
    assert load_split_file(path) == [
        {"text": "hello", "label": "0"},
        {"text": "world", "label": "1"},
    ]


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(DataError, match="absent.jsonl does not exist"):
        load_split_file(path)


def test_unknown_extension_lists_the_allowed_ones(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("hello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"allowed extensions: \.jsonl, \.json, \.csv, \.parquet"):
        load_split_file(path)


def test_missing_text_column_names_the_file_and_its_columns(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"sentence": "hi", "label": "a"}\n', encoding="utf-8")
    with pytest.raises(
        DataError, match=r"train\.jsonl has no 'text' column.*\['sentence', 'label'\]"
    ):
        load_split_file(path)


def test_missing_label_column_only_matters_for_classification(tmp_path):
    path = _write(tmp_path / "train.parquet", RECORDS, columns=("text",))
    with pytest.raises(DataError, match=r"no 'label' column.*\['text'\]"):
        load_split_file(path, require_label=True)
    assert len(load_split_file(path, require_label=False)) == 3


def test_malformed_jsonl_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": }\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.jsonl line 3: .*; it is not valid JSON"):
        load_split_file(path)


def test_jsonl_line_that_is_not_an_object_is_reported(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n["b", "y"]\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2: expected a JSON object"):
        load_split_file(path)


def test_malformed_json_array_is_reported_with_its_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"text": "a", "label": "x"},\n  {"text": "b" "label": "y"}\n]\n')
    with pytest.raises(DataError, match=r"train\.json line 3: .*; it is not valid JSON"):
        load_split_file(path)


def test_empty_file_and_null_text_are_rejected(tmp_path):
    empty = tmp_path / "train.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="is empty"):
        load_split_file(empty)
    nulls = tmp_path / "test.csv"
    nulls.write_text("text,label\nfine,a\n,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"test\.csv row 2: 'text' must be a string"):
        load_split_file(nulls)


def test_corrupt_parquet_is_a_data_error(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match=r"train\.parquet could not be read as a \.parquet table"):
        load_split_file(path)


def test_load_split_dir_mixes_formats_and_skips_absent_optional_splits(tmp_path, no_network):
    _write(tmp_path / "train.parquet", RECORDS)
    _write(tmp_path / "test.csv", RECORDS[:1])
    (tmp_path / "notes.txt").write_text("ignored", encoding="utf-8")
    splits = load_split_dir(tmp_path)
    assert list(splits) == ["train", "test"]
    assert splits["train"] == RECORDS
    assert splits["test"] == RECORDS[:1]


def test_load_split_dir_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_split_dir(tmp_path / "nowhere")
    _write(tmp_path / "validation.jsonl", RECORDS)
    with pytest.raises(DataError, match="no file for split.*train"):
        load_split_dir(tmp_path)
    _write(tmp_path / "train.json", RECORDS)
    _write(tmp_path / "train.csv", RECORDS)
    with pytest.raises(
        DataError, match=r"several files for split 'train' \(train\.json, train\.csv\)"
    ):
        load_split_dir(tmp_path)


def test_committed_sample_loads_through_the_directory_loader():
    from silotune.data.fortunes import SAMPLE_DIR

    splits = load_split_dir(SAMPLE_DIR, required=("train", "validation", "test"))
    assert [len(records) for records in splits.values()] == [400, 80, 80]


def test_ragged_csv_reports_the_parser_reason(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\na,b\nc,d,e\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"train\.csv could not be read .*Expected 2 fields in line 3"
    ):
        load_split_file(path)


def test_jsonl_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "a", "label": "x"}\n{"text": "caf\xe9", "label": "x"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl line 2 is not UTF-8 text"):
        load_split_file(path)


def test_json_that_is_not_a_list_of_objects_is_a_data_error(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('"just a string"', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.json could not be read as a \.json table"):
        load_split_file(path)


def test_csv_that_is_not_utf8_is_rejected_before_parsing(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes("text,label\nok,a\nna\u00efve,b\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"train\.csv line 3 is not UTF-8 text"):
        load_split_file(path)
