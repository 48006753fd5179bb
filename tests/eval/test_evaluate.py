"""Tests for silotune.eval.evaluate: label log-likelihood classification and LM metrics, checked
against direct computations on models whose logits we control."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from silotune.config import DataConfig, JobConfig
from silotune.data.registry import load_splits
from silotune.data.tasks import ClassificationTask, LanguageModelingTask
from silotune.errors import CheckpointError, ConfigError
from silotune.eval.evaluate import evaluate, evaluate_classification
from silotune.eval.metrics import macro_f1
from silotune.eval.runner import evaluate_job
from silotune.models.loading import load_model
from silotune.models.presets import tiny_llama_tokenizer
from silotune.models.segments import segment_attention

CPU = torch.device("cpu")


class BagOfWordsLM(nn.Module):
    """logits[t] = W[x_t] + sum_{s <= t} U[x_s]: causal, so later tokens and right padding
    cannot change earlier logits, yet the prediction depends on the whole prompt.

    With a segment mask (one-pass scoring) the sum runs over the tokens that t may attend to: the
    prompt and its own branch, so packing a wrong branch in would change the scores."""

    accepts_segment_mask = True

    def __init__(self, vocab: int, seed: int = 0, scale: float = 3.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(vocab, vocab, generator=gen) * scale)
        self.u = nn.Parameter(torch.randn(vocab, vocab, generator=gen) * scale / 4)
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        self.calls += 1
        u = self.u[input_ids] * (attention_mask > 0).unsqueeze(-1)  # (B, T, V)
        visible = segment_attention(attention_mask, torch.float32)[:, 0] == 0  # (B, T, T)
        return SimpleNamespace(logits=self.w[input_ids] + visible.float() @ u)


class FavouriteTokenLM(nn.Module):
    """Puts all probability mass on one token, whatever the input."""

    accepts_segment_mask = True

    def __init__(self, vocab: int, token: int) -> None:
        super().__init__()
        self.vocab, self.token = vocab, token

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        logits = torch.full((*input_ids.shape, self.vocab), -30.0)
        logits[..., self.token] = 30.0
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def task() -> ClassificationTask:
    splits = load_splits(DataConfig())
    return ClassificationTask(tiny_llama_tokenizer(), splits.labels, splits.prompt_template, 64)


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return load_splits(DataConfig(max_eval_examples=24)).test


def direct_label_logprob(model: nn.Module, ids: list[int], targets: list[int]) -> float:
    """log p(label tokens | prompt) for one unpadded sequence, position by position."""
    x = torch.tensor([ids])
    logits = model(x, torch.ones_like(x)).logits[0]
    total = 0.0
    for t in range(1, len(ids)):
        if targets[t] != -100:
            total += torch.log_softmax(logits[t - 1], dim=-1)[ids[t]].item()
    return total


@pytest.mark.parametrize("one_pass", [True, False], ids=["one_pass", "per_label"])
@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_classification_picks_the_most_likely_label(
    task: ClassificationTask, examples: list[dict], batch_size: int, one_pass: bool
) -> None:
    model = BagOfWordsLM(len(task.tokenizer))
    preds = []
    for ex in examples:
        scores = [direct_label_logprob(model, c.input_ids, c.labels) for c in task.candidates(ex)]
        preds.append(task.labels[max(range(len(scores)), key=scores.__getitem__)])
    assert len(set(preds)) > 1  # the model's choice depends on the text: a real test
    golds = [ex["label"] for ex in examples]
    want_acc = sum(p == g for p, g in zip(preds, golds, strict=True)) / len(golds)

    model.train()
    got = evaluate_classification(model, task, examples, batch_size, CPU, one_pass=one_pass)
    assert got["accuracy"] == pytest.approx(want_acc)
    assert got["macro_f1"] == pytest.approx(macro_f1(preds, golds, labels=task.labels))
    assert got["examples"] == float(len(examples))
    assert model.training  # the caller's mode is restored
    direct_calls = len(examples) * len(task.labels)
    forwards = model.calls - direct_calls
    if one_pass:  # one row per example (the labels fit after every prompt in 64 tokens)
        assert forwards == math.ceil(len(examples) / batch_size)
    else:
        assert forwards == math.ceil(direct_calls / batch_size)


def test_a_model_that_always_says_linux(task: ClassificationTask, examples: list[dict]) -> None:
    linux = task.label_ids[task.labels.index("linux")]
    assert len(linux) == 1
    two_labels = [ex for ex in examples if ex["label"] == "food"][:2]
    two_labels += [ex for ex in examples if ex["label"] == "linux"][:2]
    golds = [ex["label"] for ex in two_labels]
    assert sorted(golds) == ["food", "food", "linux", "linux"]
    scores = evaluate(FavouriteTokenLM(len(task.tokenizer), linux[0]), task, two_labels, 3, CPU)
    assert scores["accuracy"] == 0.5
    # macro-F1 over the label set: linux 2*2/(2*2+2) = 2/3, food 0; politics and startrek have
    # neither gold nor prediction, so they have no F1 and are left out -> (2/3 + 0) / 2
    assert scores["macro_f1"] == pytest.approx(1 / 3)


def test_lm_loss_is_token_weighted_and_perplexity_its_exp() -> None:
    loaded = load_model("tiny-llama", "cpu", "float32")
    task = LanguageModelingTask(loaded.tokenizer, max_length=24)
    texts = ["Hello world.", "A much longer line of text about penguins and Linux kernels.", "Ok"]
    examples = [{"text": t} for t in texts]
    total, count = 0.0, 0
    for ex in examples:
        enc = task.encode(ex)
        x = torch.tensor([enc.input_ids])
        with torch.no_grad():
            mean = loaded.model(input_ids=x, labels=x).loss.item()  # HF: mean over T-1 targets
        total += mean * (len(enc.input_ids) - 1)
        count += len(enc.input_ids) - 1
    scores = evaluate(loaded.model, task, examples, 2, CPU)
    assert set(scores) == {"loss", "perplexity", "rouge_l"}
    assert scores["loss"] == pytest.approx(total / count, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert 0.0 <= scores["rouge_l"] <= 1.0


def test_runner_rejects_a_bad_split_and_a_missing_adapter(make_job, tmp_path: Path) -> None:
    cfg: JobConfig = make_job()
    with pytest.raises(ConfigError, match="validation or test"):
        evaluate_job(cfg, None, "train")
    with pytest.raises(CheckpointError, match="has no adapter_config.json"):
        evaluate_job(cfg, tmp_path / "nothing", "test")
    base = evaluate_job(cfg, None, "validation")
    assert base["examples"] == 8.0 and 0.0 <= base["accuracy"] <= 1.0
