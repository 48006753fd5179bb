"""Tests for silotune.data.dictionaries: dictd reading, definitions, splits without leaks, MC.

The tests on the real dictionaries need Debian's dict-foldoc, dict-jargon and wordnet-base
(``.ci/run`` installs them); without them they skip and say so.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from silotune.data import dictionaries as d
from silotune.data.instruct_files import load_instruction_dir, load_multiple_choice
from silotune.errors import DataError

MISSING = d.packages_missing()
needs_packages = pytest.mark.skipif(
    bool(MISSING), reason=f"Debian packages {', '.join(MISSING)} not installed (apt-get install)"
)

FOLDOC = {
    "stack": "stack\n\n   <data> A {data structure} where the last item in is the first\n"
    "   out.  It is used for calls.  More text follows here.\n\n   (1996-01-01)\n\n",
    "see-only": "see-only\n\n   <jargon> See {stack}.\n\n",
}
JARGON = {
    "frob": "frob\n /frob/, n.\n\n    [MIT] 1. To fiddle with a thing aimlessly.\n\n"
    "    2. Another sense.\n\n",
}


def _b64(n: int) -> str:
    digits = ""
    while True:
        digits = d._B64[n % 64] + digits
        n //= 64
        if not n:
            return digits


def write_dictd(root: Path, name: str, entries: dict[str, str]) -> None:
    """A dictd dictionary (index + gzip'd text) holding `entries`."""
    text, index = b"", []
    for head, body in entries.items():
        raw = body.encode()
        index.append(f"{head}\t{_b64(len(text))}\t{_b64(len(raw))}")
        text += raw
    (root / f"{name}.index").write_text("\n".join(index) + "\n", encoding="utf-8")
    (root / f"{name}.dict.dz").write_bytes(gzip.compress(text))


def test_dictd_numbers_are_base64_digits() -> None:
    assert d.dictd_number("A") == 0
    assert d.dictd_number("K5") == 10 * 64 + 57  # the FOLDOC index's first length
    assert d.dictd_number("BAA") == 64 * 64
    with pytest.raises(DataError, match="not a dictd base64 number"):
        d.dictd_number("a-b")


def test_read_dictd_and_definitions(tmp_path: Path) -> None:
    write_dictd(tmp_path, "foldoc", FOLDOC)
    entries = dict(d.read_dictd(tmp_path / "foldoc.index", tmp_path / "foldoc.dict.dz"))
    assert entries == FOLDOC
    assert d.foldoc_definition(FOLDOC["stack"]) == (
        "A data structure where the last item in is the first out. It is used for calls. "
        "More text follows here."
    )
    assert d.foldoc_definition(FOLDOC["see-only"]) is None
    assert d.jargon_definition(JARGON["frob"]) == "To fiddle with a thing aimlessly."
    assert d._first_sentences("One two. Three four. Five.", 20) == "One two. Three four."
    assert d._first_sentences("A very long first sentence.", 5) == "A very long first sentence."


def test_wordnet_nouns(tmp_path: Path) -> None:
    (tmp_path / "data.noun").write_text(
        "  1 licence header line\n"
        '00001 03 n 01 dog 0 000 | a domesticated canid; "the dog barked"\n'
        "00002 03 n 01 Paris 0 000 | the capital of France\n"
        "00003 03 n 02 hot_dog 0 frank 0 000 | a sausage in a bun\n",
        encoding="utf-8",
    )
    assert d.read_wordnet_nouns(tmp_path) == [
        ("dog", "a domesticated canid"),
        ("hot dog", "a sausage in a bun"),
    ]


def test_a_term_has_one_split_whatever_its_domain() -> None:
    assert d._bucket("Stack", 0) == d._bucket("  stack ", 0)
    assert d._split_of(0.05, (0.8, 0.1, 0.1)) == "train"
    assert d._split_of(0.85, (0.8, 0.1, 0.1)) == "validation"
    assert d._split_of(0.95, (0.8, 0.1, 0.1)) == "test"


def test_multiple_choice_draws_distractors_from_the_same_domain() -> None:
    records = [d.make_record(f"t{i}", f"definition {i}", "jargon") for i in range(5)]
    records += [d.make_record(f"g{i}", f"general {i}", "general") for i in range(4)]
    questions = d.multiple_choice(records, seed=0)
    assert questions == d.multiple_choice(records, seed=0)  # deterministic
    assert len(questions) == 9
    for q, record in zip(questions, records, strict=True):
        assert q["choices"][d.LETTERS.index(q["answer"])] == record["output"]
        assert len(set(q["choices"])) == 4
        prefix = "definition" if record["domain"] == "jargon" else "general"
        assert all(c.startswith(prefix) for c in q["choices"])


def test_committed_sample_is_well_formed_and_leak_free() -> None:
    splits = load_instruction_dir(d.SAMPLE_DIR)
    assert {k: len(v) for k, v in splits.items()} == {"train": 300, "validation": 60, "test": 60}
    outputs = {k: {r["messages"][-1]["content"] for r in v} for k, v in splits.items()}
    assert not outputs["train"] & outputs["test"] and not outputs["train"] & outputs["validation"]
    assert not outputs["validation"] & outputs["test"]
    for records in splits.values():
        assert {r["domain"] for r in records} == {"computing", "general", "jargon"}
    mc = load_multiple_choice(d.SAMPLE_DIR / d.MC_FILE)
    assert len(mc) == 60
    assert {q["choices"][d.LETTERS.index(q["answer"])] for q in mc} == outputs["test"]
    size = sum(p.stat().st_size for p in d.SAMPLE_DIR.iterdir())
    assert size < 300_000
    meta = json.loads((d.SAMPLE_DIR / "meta.json").read_text(encoding="utf-8"))
    assert meta["builder"] == f"silotune.data.dictionaries.{d.SAMPLE_CALL}"


@needs_packages
def test_the_committed_sample_is_exactly_the_documented_rebuild(
    tmp_path: Path, main_in_process
) -> None:
    out = tmp_path / "s"
    result = main_in_process("data", "dictionaries", "--sample", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in d.SAMPLE_DIR.iterdir())
    for path in sorted(d.SAMPLE_DIR.iterdir()):
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.slow
@needs_packages
def test_full_build_is_deterministic_deduplicated_and_leak_free() -> None:
    first = d.build_dictionary_splits(max_chars=120)
    assert first == d.build_dictionary_splits(max_chars=120)
    terms = {s: {d._key(r["term"]) for r in first[s]} for s in d.SPLITS}
    assert not terms["train"] & terms["test"] and not terms["train"] & terms["validation"]
    assert not terms["validation"] & terms["test"]
    outputs = [d._key(r["output"]) for s in d.SPLITS for r in first[s]]
    assert len(outputs) == len(set(outputs))
    for split in d.SPLITS:
        assert {r["domain"] for r in first[split]} == set(d.DOMAINS)
    assert len(first["multiple_choice"]) == len(first["test"])


def test_cli_refuses_clearly_without_the_packages(
    tmp_path: Path, monkeypatch, main_in_process
) -> None:
    from tests.conftest import assert_clean_error

    monkeypatch.setattr(d, "packages_missing", lambda: ["dict-jargon"])
    result = main_in_process("data", "dictionaries", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert_clean_error(result, "apt-get install dict-jargon")
