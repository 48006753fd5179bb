"""Evaluate a causal LM on a task: label log-likelihood classification, LM loss and ROUGE-L, instruction."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from silotune.config.instruct import EvalConfig
from silotune.data.instruct import InstructionTask
from silotune.data.tasks import ClassificationTask, Encoded, LanguageModelingTask, collate
from silotune.eval.instruct import evaluate_instruction
from silotune.eval.metrics import accuracy, macro_f1, mean_rouge_l
from silotune.eval.one_pass import score_one_pass
from silotune.progress import ProgressHook


def _sequence_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log p(target tokens) per sequence. Returns (B,)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    mask = targets >= 0
    # Normalise only at target positions: a full (B, T, V) log-softmax costs far more than the
    # few label tokens that classification scores.
    picked = out.logits[:, :-1, :][mask].float()  # (N, V)
    logp = torch.log_softmax(picked, dim=-1).gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(targets.size(0), device=targets.device).unsqueeze(1).expand_as(targets)
    return torch.zeros(targets.size(0), device=logp.device).index_add_(0, rows[mask], logp)


def _batches(items: list[Encoded], size: int, pad_id: int, device: torch.device):
    for start in range(0, len(items), size):
        batch = collate(items[start : start + size], pad_id)
        yield {k: v.to(device) for k, v in batch.items()}


def _score_all(
    model: nn.Module,
    items: list[Encoded],
    size: int,
    pad_id: int,
    device: torch.device,
    on_progress: ProgressHook | None = None,
) -> list[float]:
    """Sequence log-likelihoods in input order, batching sequences of similar length together."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    sorted_items = [items[i] for i in order]
    total = -(-len(items) // size)
    flat: list[float] = []
    for done, batch in enumerate(_batches(sorted_items, size, pad_id, device), start=1):
        flat += _sequence_logprobs(model, batch).tolist()
        if on_progress is not None:
            on_progress(done, total)
    scores = [0.0] * len(items)
    for position, index in enumerate(order):
        scores[index] = flat[position]
    return scores


@torch.no_grad()
def label_scores(
    model: nn.Module,
    task: ClassificationTask,
    examples: list[dict],
    batch_size: int,
    device: torch.device,
    on_progress: ProgressHook | None = None,
    one_pass: bool = True,
) -> torch.Tensor:
    """Log-likelihood of each label after each example's prompt, ``(N, K)`` float64."""
    if one_pass:
        prompts = [task.prompt_ids(ex["text"]) for ex in examples]
        return score_one_pass(
            model,
            prompts,
            task.label_ids,
            task.max_length,
            batch_size,
            task.tokenizer.pad_token_id,
            device,
            on_progress,
        )
    candidates = [c for ex in examples for c in task.candidates(ex)]
    pad_id = task.tokenizer.pad_token_id
    flat = _score_all(model, candidates, batch_size, pad_id, device, on_progress)
    return torch.tensor(flat, dtype=torch.float64).reshape(len(examples), len(task.labels))


@torch.no_grad()
def evaluate_classification(
    model: nn.Module,
    task: ClassificationTask,
    examples: list[dict],
    batch_size: int,
    device: torch.device,
    on_progress: ProgressHook | None = None,
    one_pass: bool = True,
) -> dict[str, float]:
    """Predict the label whose tokens are most likely after the prompt; accuracy and macro-F1.

    ``one_pass`` scores every label from one pass over the prompt (:mod:`silotune.eval.one_pass`);
    ``False`` runs ``prompt + label`` once per label (the reference ``silotune bench eval``
    compares it with).
    """
    was_training = model.training
    model.eval()
    scores = label_scores(model, task, examples, batch_size, device, on_progress, one_pass)
    preds = [task.labels[int(row.argmax())] for row in scores]
    golds = [ex["label"] for ex in examples]
    model.train(was_training)
    return {
        "accuracy": accuracy(preds, golds),
        "macro_f1": macro_f1(preds, golds, labels=task.labels),
        "examples": float(len(examples)),
    }


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    task: LanguageModelingTask,
    examples: list[dict],
    batch_size: int,
    device: torch.device,
    max_new_tokens: int = 32,
    on_progress: ProgressHook | None = None,
) -> dict[str, float]:
    """Token-weighted loss and perplexity; ROUGE-L of greedy continuations of each text's first half."""
    was_training = model.training
    model.eval()
    tok = task.tokenizer
    encoded = [task.encode(ex) for ex in examples]
    total, count = 0.0, 0
    steps = -(-len(encoded) // batch_size) + len(encoded)  # scoring batches + one generation each
    done = 0
    for batch in _batches(encoded, batch_size, tok.pad_token_id, device):
        n_targets = int((batch["labels"][:, 1:] >= 0).sum())
        total += -float(_sequence_logprobs(model, batch).sum())
        count += n_targets
        done += 1
        if on_progress is not None:
            on_progress(done, steps)
    preds, refs = [], []
    for enc in encoded:
        half = max(1, len(enc.input_ids) // 2)
        prompt = torch.tensor([enc.input_ids[:half]], device=device)
        want = enc.input_ids[half:][:max_new_tokens]
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max(1, len(want)),
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        preds.append(tok.decode(out[0, half:], skip_special_tokens=True))
        refs.append(tok.decode(want, skip_special_tokens=True))
        done += 1
        if on_progress is not None:
            on_progress(done, steps)
    model.train(was_training)
    loss = total / max(1, count)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "rouge_l": mean_rouge_l(preds, refs),
    }


def evaluate(
    model: nn.Module,
    task: ClassificationTask | LanguageModelingTask | InstructionTask,
    examples: list[dict],
    batch_size: int,
    device: torch.device,
    on_progress: ProgressHook | None = None,
    eval_cfg: EvalConfig | None = None,
    generate_for: int | None = None,
    multiple_choice: list[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Evaluate with the metrics of the task's kind.

    The last three arguments apply to instruction only (:mod:`silotune.eval.instruct`):
    decoding settings, how many examples get a generated response (None = all) and the
    multiple-choice records to score.
    """
    if isinstance(task, InstructionTask):
        return evaluate_instruction(
            model,
            task,
            examples,
            batch_size,
            device,
            eval_cfg,
            generate_for,
            multiple_choice,
            on_progress,
        )
    if isinstance(task, ClassificationTask):
        return evaluate_classification(model, task, examples, batch_size, device, on_progress)
    return evaluate_lm(model, task, examples, batch_size, device, on_progress=on_progress)
