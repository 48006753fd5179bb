"""Evaluate instruction tuning: response loss and perplexity, generation, multiple choice.

- ``loss`` / ``perplexity``: mean cross-entropy over the response tokens only (the tokens
  training puts loss on), weighted by token, and its exponential.
- ``rouge_l`` / ``exact_match``: the response generated for each prompt (greedy unless
  ``eval.temperature`` > 0; at most ``eval.max_new_tokens``) against the reference, both on
  normalised text (:func:`silotune.eval.metrics.normalize_answer`: stripped, lower-cased, whitespace
  collapsed); ROUGE-L is the F-measure of the longest common subsequence of whitespace tokens.
- ``mc_accuracy``: multiple-choice records scored MMLU-style, by the log-likelihood of each answer
  letter after the question and its lettered choices, all letters in one pass over the prompt
  (:func:`silotune.eval.one_pass.score_one_pass`). A prompt longer than ``data.max_length``
  allows is cut from the left; ``mc_truncated`` counts them (and a warning says so).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from silotune.config.instruct import EvalConfig
from silotune.data.instruct import InstructionTask
from silotune.data.tasks import IGNORE_INDEX, collate
from silotune.eval.metrics import exact_match, mean_rouge_l_normalized, perplexity
from silotune.eval.one_pass import score_one_pass
from silotune.progress import ProgressHook

logger = logging.getLogger(__name__)


@torch.no_grad()
def response_loss(
    model: nn.Module,
    task: InstructionTask,
    records: list[dict[str, Any]],
    batch_size: int,
    device: torch.device,
) -> tuple[float, int]:
    """Summed cross-entropy (nats) over every response token of `records`, and their count."""
    encoded = sorted((task.encode(r) for r in records), key=lambda e: len(e.input_ids))
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], task.tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
        total += float(
            nn.functional.cross_entropy(
                logits[:, :-1, :].float().reshape(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        )
        count += int((targets != IGNORE_INDEX).sum())
    return total, count


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    task: InstructionTask,
    prompts: list[list[int]],
    cfg: EvalConfig,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
) -> list[str]:
    """Decode a response to each prompt (token ids), batched with left padding, in input order."""
    tok = task.tokenizer
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts = [""] * len(prompts)
    sampling = cfg.temperature > 0
    options: dict[str, Any] = {"do_sample": sampling}
    if sampling:
        options.update(temperature=cfg.temperature, top_p=cfg.top_p)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # sampled responses are the same on every run
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # left padding: every prompt ends at column width-1
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=cfg.max_new_tokens,
                eos_token_id=task.stop_ids or None,
                pad_token_id=tok.pad_token_id,
                **options,
            )  # (B, width + new)
            for row, i in enumerate(chunk):
                texts[i] = tok.decode(out[row, width:], skip_special_tokens=True).strip()
    return texts


@torch.no_grad()
def multiple_choice_accuracy(
    model: nn.Module,
    task: InstructionTask,
    records: list[dict[str, Any]],
    batch_size: int,
    device: torch.device,
) -> tuple[float, int]:
    """Share of records whose answer letter is the most likely one after the question, and how
    many prompts were cut to fit ``data.max_length`` (their scores are then less meaningful)."""
    by_count: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        by_count.setdefault(len(record["choices"]), []).append(record)
    hits, cut = 0, 0
    for count, group in sorted(by_count.items()):
        parts = [task.mc_prompt_parts(r) for r in group]
        prompts = [ids for ids, _ in parts]
        cut += sum(was_cut for _, was_cut in parts)
        letters = task.letter_ids(count)
        longest = max(len(p) for p in prompts) + max(len(ids) for ids in letters)
        scores = score_one_pass(
            model, prompts, letters, longest, batch_size, task.tokenizer.pad_token_id, device
        )  # (N, count)
        picked = scores.argmax(dim=1).tolist()
        hits += sum(chr(ord("A") + p) == r["answer"] for p, r in zip(picked, group, strict=True))
    if cut:
        logger.warning(
            "multiple choice: %d of %d prompts were longer than data.max_length %d allows and "
            "were cut from the left; raise data.max_length to score them whole",
            cut,
            len(records),
            task.max_length,
        )
    return hits / len(records), cut


def evaluate_instruction(
    model: nn.Module,
    task: InstructionTask,
    records: list[dict[str, Any]],
    batch_size: int,
    device: torch.device,
    cfg: EvalConfig | None = None,
    generate_for: int | None = None,
    multiple_choice: list[dict[str, Any]] | None = None,
    on_progress: ProgressHook | None = None,
) -> dict[str, float]:
    """Scores of the module docstring on `records` (and `multiple_choice` when given).

    ``generate_for`` caps how many records (the first ones) get a generated response; 0 skips
    generation (no ``rouge_l``/``exact_match`` keys), None generates for all.
    """
    cfg = cfg or EvalConfig()
    was_training = model.training
    model.eval()
    steps, done = 3, 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, steps)

    total, count = response_loss(model, task, records, batch_size, device)
    loss = total / max(1, count)
    scores: dict[str, float] = {"loss": loss, "perplexity": perplexity(min(loss, 50.0))}
    tick()
    chosen = records if generate_for is None else records[:generate_for]
    if chosen:
        prompts = [task.prompt_ids(r["messages"]) for r in chosen]
        preds = generate_responses(model, task, prompts, cfg, batch_size, device)
        refs = [r["messages"][-1]["content"] for r in chosen]
        scores["rouge_l"] = mean_rouge_l_normalized(preds, refs)
        scores["exact_match"] = exact_match(preds, refs)
        scores["generated"] = float(len(chosen))
    tick()
    if multiple_choice:
        accuracy, cut = multiple_choice_accuracy(model, task, multiple_choice, batch_size, device)
        scores["mc_accuracy"] = accuracy
        scores["mc_examples"] = float(len(multiple_choice))
        scores["mc_truncated"] = float(cut)
    tick()
    scores["examples"] = float(len(records))
    model.train(was_training)
    return scores
