"""Turn examples into token ids (classification-as-generation, LM, instruction) and batch them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from silotune.errors import DataError

if TYPE_CHECKING:
    from silotune.config.instruct import InstructConfig
    from silotune.data.instruct import InstructionTask

IGNORE_INDEX = -100  # label value that cross-entropy skips (prompt and padding positions)


@dataclass(frozen=True)
class Encoded:
    """One training sequence: token ids and per-token targets (IGNORE_INDEX where no loss)."""

    input_ids: list[int]
    labels: list[int]


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # add_special_tokens=True so tokenizers that expect a BOS (Llama, SmolLM2) get one.
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


class ClassificationTask:
    """Classification as generation: `prompt -> " <label>"`, loss on the label tokens only.

    Long prompts are truncated from the left (the template's tail, e.g. "Category:", is kept,
    and so are special tokens the tokenizer puts first, such as a BOS), so that prompt + label
    fits in `max_length` tokens.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        labels: list[str],
        template: str,
        max_length: int,
    ) -> None:
        if len(labels) < 2:
            raise DataError(
                f"classification needs at least 2 labels, the training data has {labels}"
            )
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.template = template
        self.max_length = max_length
        self.label_ids = [
            list(tokenizer(" " + lab, add_special_tokens=False)["input_ids"]) for lab in labels
        ]
        self.longest_label = max(len(ids) for ids in self.label_ids)
        if self.longest_label >= max_length // 2:
            raise DataError(
                f"a label takes {self.longest_label} tokens; data.max_length {max_length} is too "
                "short"
            )

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt's token ids, cut from the left to leave room for the longest label.

        Every label is trained and scored after this same prompt, so the one-pass scorer
        (:mod:`silotune.eval.one_pass`) and the per-label one see the same context.
        """
        prompt = _prompt_ids(self.tokenizer, self.template.format(text=text))
        room = self.max_length - self.longest_label  # > max_length // 2, checked in __init__
        if len(prompt) > room:
            special = set(self.tokenizer.all_special_ids)
            lead = 0
            while lead < len(prompt) and lead < room // 2 and prompt[lead] in special:
                lead += 1
            prompt = prompt[:lead] + prompt[len(prompt) - (room - lead) :]
        return prompt

    def _join(self, text: str, label_ids: list[int]) -> Encoded:
        prompt = self.prompt_ids(text)
        return Encoded(prompt + label_ids, [IGNORE_INDEX] * len(prompt) + label_ids)

    def encode(self, example: dict) -> Encoded:
        """Encode an example with its gold label as the target."""
        label = example["label"]
        if label not in self.labels:
            raise DataError(f"label '{label}' is not one of the training labels {self.labels}")
        return self._join(example["text"], self.label_ids[self.labels.index(label)])

    def candidates(self, example: dict) -> list[Encoded]:
        """Encode an example once per label (for scoring each label's log-likelihood)."""
        return [self._join(example["text"], ids) for ids in self.label_ids]


class LanguageModelingTask:
    """Causal LM on the whole text; evaluation continues the first half greedily."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def encode(self, example: dict) -> Encoded:
        ids = _prompt_ids(self.tokenizer, example["text"])[: self.max_length]
        if self.tokenizer.eos_token_id is not None and len(ids) < self.max_length:
            ids.append(self.tokenizer.eos_token_id)
        if len(ids) < 2:
            # One token predicts nothing: a batch of such examples would have no loss at all.
            raise DataError(
                f"an lm example has fewer than 2 tokens (empty text?): {example['text']!r}"
            )
        return Encoded(ids, list(ids))


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of sequences into `input_ids`, `attention_mask`, `labels`, each (B, T)."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, enc in enumerate(batch):
        n = len(enc.input_ids)
        input_ids[row, :n] = torch.tensor(enc.input_ids)
        labels[row, :n] = torch.tensor(enc.labels)
        mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def make_task(
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    labels: list[str],
    template: str,
    max_length: int,
    instruct: InstructConfig | None = None,
) -> ClassificationTask | LanguageModelingTask | InstructionTask:
    """Build the task object named by `data.task` (`instruct`: `data.instruct`, for instruction)."""
    if task == "classification":
        return ClassificationTask(tokenizer, labels, template, max_length)
    if task == "lm":
        return LanguageModelingTask(tokenizer, max_length)
    if task == "instruction":
        from silotune.config.instruct import InstructConfig
        from silotune.data.instruct import InstructionTask

        return InstructionTask(tokenizer, instruct or InstructConfig(), max_length)
    raise DataError(f"unknown data.task '{task}' (allowed: classification, lm, instruction)")
