"""Tests for instruction evaluation: metrics by hand, the response-only loss, generation, MC."""

from __future__ import annotations

import pytest
import torch

from silotune.config import DataConfig
from silotune.config.instruct import EvalConfig, InstructConfig
from silotune.data.instruct import InstructionTask
from silotune.data.registry import load_splits
from silotune.data.tasks import IGNORE_INDEX, collate
from silotune.eval.evaluate import evaluate
from silotune.eval.instruct import (
    generate_responses,
    multiple_choice_accuracy,
    response_loss,
)
from silotune.eval.metrics import exact_match, mean_rouge_l_normalized, normalize_answer
from silotune.models.presets import build_tiny_llama
from silotune.train.loop import causal_lm_loss

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny_llama(seed=0)
    return model, InstructionTask(tokenizer, InstructConfig(), max_length=96)


@pytest.fixture(scope="module")
def splits():
    return load_splits(DataConfig(dataset="dictionaries-sample", task="instruction"))


def test_exact_match_normalises_case_and_whitespace() -> None:
    assert normalize_answer("  The  Cat\n sat ") == "the cat sat"
    # "Dog!" keeps its punctuation, so it does not match "dog"
    assert exact_match(["  The  Cat\n sat ", "dog"], ["the cat sat", "Dog!"]) == 0.5


def test_rouge_l_f_by_hand() -> None:
    # pred: the cat sat on the mat (6), ref: the cat lay on a mat (6); LCS the cat on mat = 4
    # P = R = 4/6, F = 2/3; case is normalised away
    assert mean_rouge_l_normalized(["The cat sat on the mat"], ["the cat LAY on a mat"]) == (
        pytest.approx(2 / 3)
    )
    # pred: a b (2), ref: a x b y (4); LCS 2: P = 1, R = 1/2, F = 2/3; and an empty prediction 0
    assert mean_rouge_l_normalized(["a b", ""], ["a x b y", "z"]) == pytest.approx((2 / 3) / 2)


def test_prompt_tokens_get_no_gradient(tiny, splits) -> None:
    """The loss's gradient reaches only the logits that predict response tokens."""
    model, task = tiny
    enc = task.encode(splits.train[0])
    n_prompt = enc.labels.count(IGNORE_INDEX)
    batch = collate([enc], task.tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"]).logits.detach().requires_grad_(True)
    causal_lm_loss(logits, batch["labels"]).backward()
    per_position = logits.grad[0].abs().sum(-1)  # (T,)
    # position t predicts token t + 1: the prompt's positions before its last see no gradient
    assert torch.all(per_position[: n_prompt - 1] == 0)
    assert torch.all(per_position[n_prompt - 1 : len(enc.input_ids) - 1] > 0)
    assert per_position[-1] == 0  # the last token predicts nothing


def test_response_loss_ignores_the_prompt(tiny, splits) -> None:
    model, task = tiny
    records = splits.validation[:6]
    total, count = response_loss(model, task, records, batch_size=4, device=CPU)
    assert count == sum(
        len(task.encode(r).labels) - task.encode(r).labels.count(IGNORE_INDEX) for r in records
    )
    # one by one through the training loss (a mean over response tokens) gives the same sum
    by_one = 0.0
    for record in records:
        enc = task.encode(record)
        batch = collate([enc], task.tokenizer.pad_token_id)
        n = len(enc.labels) - enc.labels.count(IGNORE_INDEX)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"]).logits
        by_one += float(causal_lm_loss(logits, batch["labels"])) * n
    assert total == pytest.approx(by_one, rel=1e-5)


def test_batched_generation_equals_one_at_a_time(tiny, splits) -> None:
    model, task = tiny
    prompts = [task.prompt_ids(r["messages"]) for r in splits.test[:5]]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    cfg = EvalConfig(max_new_tokens=6)
    batched = generate_responses(model, task, prompts, cfg, batch_size=5, device=CPU)
    alone = [generate_responses(model, task, [p], cfg, 1, CPU)[0] for p in prompts]
    assert batched == alone
    assert any(text for text in batched)
    sampled = EvalConfig(max_new_tokens=6, temperature=1.0, top_p=0.9)
    first = generate_responses(model, task, prompts, sampled, 5, CPU, seed=3)
    assert first == generate_responses(model, task, prompts, sampled, 5, CPU, seed=3)


def test_multiple_choice_accuracy_equals_full_forward_argmax(tiny, splits) -> None:
    model, task = tiny
    records = splits.multiple_choice[:12]
    letters = [ids[0] for ids in task.letter_ids(4)]
    hits = 0
    for record in records:
        prompt = torch.tensor([task.mc_prompt_ids(record)])
        with torch.no_grad():
            last = model(input_ids=prompt).logits[0, -1]
        hits += "ABCD"[int(last[letters].argmax())] == record["answer"]
    got, cut = multiple_choice_accuracy(model, task, records, batch_size=5, device=CPU)
    assert got == hits / len(records)
    assert cut == sum(task.mc_prompt_parts(r)[1] for r in records) > 0  # max_length 96 is short
    roomy = InstructionTask(task.tokenizer, InstructConfig(), max_length=320)
    assert multiple_choice_accuracy(model, roomy, records, 5, CPU)[1] == 0


def test_evaluate_reports_the_instruction_metrics(tiny, splits) -> None:
    model, task = tiny
    cfg = EvalConfig(max_new_tokens=4)
    cheap = evaluate(model, task, splits.validation[:4], 4, CPU, eval_cfg=cfg, generate_for=0)
    assert set(cheap) == {"loss", "perplexity", "examples"}
    assert cheap["perplexity"] == pytest.approx(torch.tensor(cheap["loss"]).exp().item(), rel=1e-6)
    full = evaluate(
        model,
        task,
        splits.test[:4],
        4,
        CPU,
        eval_cfg=cfg,
        multiple_choice=splits.multiple_choice[:4],
    )
    assert set(full) == {
        "loss", "perplexity", "rouge_l", "exact_match", "generated", "mc_accuracy",
        "mc_examples", "mc_truncated", "examples",
    }  # fmt: skip
    assert full["generated"] == 4 and full["mc_examples"] == 4
    assert not model.training
