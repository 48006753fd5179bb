"""Tests for silotune.data.tasks: label-only targets, left truncation, candidates, LM, collate."""

from __future__ import annotations

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from silotune.data.tasks import (
    IGNORE_INDEX,
    ClassificationTask,
    Encoded,
    LanguageModelingTask,
    collate,
    make_task,
)
from silotune.errors import DataError
from silotune.models.presets import tiny_llama_tokenizer

LABELS = ["food", "linux", "politics", "startrek"]
TEMPLATE = "Fortune: {text}\nCategory:"


@pytest.fixture(scope="module")
def tok():
    return tiny_llama_tokenizer()


@pytest.fixture(scope="module")
def bos_tok():
    """The tiny tokenizer, made to put a BOS first like Llama's."""
    tokenizer = tiny_llama_tokenizer()
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    return tokenizer


def test_only_label_tokens_are_targets(tok) -> None:
    task = ClassificationTask(tok, LABELS, TEMPLATE, max_length=64)
    enc = task.encode({"text": "Beam me up.", "label": "startrek"})
    label_ids = tok(" startrek", add_special_tokens=False)["input_ids"]
    assert len(label_ids) > 1  # a multi-token label, so every label token is checked
    n = len(enc.input_ids) - len(label_ids)
    assert enc.labels == [IGNORE_INDEX] * n + label_ids
    assert enc.input_ids[n:] == label_ids
    assert tok.decode(enc.input_ids) == "Fortune: Beam me up.\nCategory: startrek"


@pytest.mark.parametrize("max_length", [16, 24, 40])
def test_truncation_keeps_the_template_tail_and_the_label(tok, max_length: int) -> None:
    task = ClassificationTask(tok, LABELS, TEMPLATE, max_length=max_length)
    text = " ".join(f"word{i}" for i in range(200)) + " LASTWORD"
    enc = task.encode({"text": text, "label": "linux"})
    # the prompt leaves room for the longest label, whichever label follows it
    linux = len(task.label_ids[task.labels.index("linux")])
    assert task.longest_label > linux
    assert len(enc.input_ids) == max_length - task.longest_label + linux
    assert tok.decode(enc.input_ids).endswith(" LASTWORD\nCategory: linux")
    longest = task.labels[[len(ids) for ids in task.label_ids].index(task.longest_label)]
    assert len(task.encode({"text": text, "label": longest}).input_ids) == max_length
    assert enc.labels[-1] != IGNORE_INDEX and enc.labels[0] == IGNORE_INDEX


def test_truncation_keeps_a_leading_bos(bos_tok) -> None:
    task = ClassificationTask(bos_tok, LABELS, TEMPLATE, max_length=20)
    short = task.encode({"text": "Hi.", "label": "food"})
    assert short.input_ids[0] == bos_tok.bos_token_id
    long = task.encode({"text": "blah " * 100 + "end.", "label": "food"})
    food = len(task.label_ids[task.labels.index("food")])
    assert len(long.input_ids) == 20 - task.longest_label + food
    assert long.input_ids[0] == bos_tok.bos_token_id
    assert bos_tok.decode(long.input_ids[1:]).endswith("end.\nCategory: food")


def test_candidates_are_one_per_label_with_the_same_prompt(tok) -> None:
    task = ClassificationTask(tok, LABELS, TEMPLATE, max_length=64)
    example = {"text": "Free software.", "label": "linux"}
    cands = task.candidates(example)
    assert len(cands) == len(LABELS)
    for label, cand in zip(LABELS, cands, strict=True):
        assert tok.decode(cand.input_ids) == f"Fortune: Free software.\nCategory: {label}"
        targets = [t for t in cand.labels if t != IGNORE_INDEX]
        assert targets == tok(" " + label, add_special_tokens=False)["input_ids"]
    assert cands[LABELS.index("linux")] == task.encode(example)
    unlabeled = task.candidates({"text": "Free software."})  # no gold label needed
    assert unlabeled == cands


@pytest.mark.parametrize(
    ("labels", "max_length", "example", "message"),
    [
        (["only"], 64, None, "at least 2 labels"),
        (["a", "supercalifragilistic " * 4], 16, None, "too short"),
        (LABELS, 64, {"text": "x", "label": "cooking"}, "not one of the training labels"),
    ],
)
def test_classification_errors(tok, labels, max_length, example, message) -> None:
    with pytest.raises(DataError, match=message):
        ClassificationTask(tok, labels, TEMPLATE, max_length).encode(example)


def test_lm_targets_every_token_and_ends_with_eos(tok) -> None:
    task = LanguageModelingTask(tok, max_length=32)
    enc = task.encode({"text": "Hello there, general."})
    assert enc.labels == enc.input_ids
    assert enc.input_ids[-1] == tok.eos_token_id
    assert tok.decode(enc.input_ids[:-1]) == "Hello there, general."
    long = task.encode({"text": "word " * 100})
    assert len(long.input_ids) == 32 and long.input_ids[-1] != tok.eos_token_id


def test_collate_right_pads_with_ignored_targets() -> None:
    batch = collate([Encoded([5, 6, 7], [-100, 6, 7]), Encoded([8], [8])], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_make_task(tok) -> None:
    assert isinstance(make_task(tok, "classification", LABELS, TEMPLATE, 64), ClassificationTask)
    assert isinstance(make_task(tok, "lm", [], TEMPLATE, 64), LanguageModelingTask)
    with pytest.raises(DataError, match="allowed: classification, lm"):
        make_task(tok, "qa", LABELS, TEMPLATE, 64)


def test_lm_example_too_short_to_predict_anything_is_refused(tok) -> None:
    task = LanguageModelingTask(tok, max_length=32)
    with pytest.raises(DataError, match="fewer than 2 tokens"):
        task.encode({"text": ""})
