"""One-pass label scoring equals the per-label reference on real models and adapters."""

from __future__ import annotations

import pytest
import torch

from silotune.data.tasks import ClassificationTask
from silotune.eval.evaluate import evaluate_classification, label_scores
from silotune.eval.one_pass import pack_rows
from silotune.models.segments import segment_attention, segment_positions
from silotune.train.job import build_job

CPU = torch.device("cpu")
TOL = 1e-5  # float32 reordering between a packed row and separate rows

# Labels of 1 to 5 tokens with the tiny tokenizer, so packing has branches of several lengths.
LABELS = ["linux", "food", "star trek episodes", "politics and law", "wisdom of the ages"]


def test_segment_mask_attention_and_positions() -> None:
    # prompt of 3, branch 2 of 2 tokens, branch 3 of 1 token, one padding slot
    mask = torch.tensor([[1, 1, 1, 2, 2, 3, 0]])
    assert segment_positions(mask).tolist() == [[0, 1, 2, 3, 4, 3, 1]]
    visible = (segment_attention(mask, torch.float32)[0, 0] == 0).int()
    assert visible.tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 1, 0],  # branch 3 sees the prompt, not branch 2
        [0, 0, 0, 0, 0, 0, 1],  # padding sees itself only
    ]
    with_prefix = segment_attention(mask, torch.float32, prefix=2)[0, 0]
    assert with_prefix.shape == (7, 9) and bool((with_prefix[:, :2] == 0).all())
    # a plain 0/1 mask gives the usual causal positions
    assert segment_positions(torch.tensor([[1, 1, 1, 0]])).tolist() == [[0, 1, 2, 1]]


def test_pack_rows_fits_max_length_and_targets_every_label_token() -> None:
    labels = [[7], [8, 9], [10, 11, 12], [13, 14, 15, 16]]
    prompts = [[1, 2, 3], list(range(20, 30))]
    rows = pack_rows(prompts, labels, max_length=13)
    assert max(len(r.input_ids) for r in rows) <= 13
    assert [r.example for r in rows] == [0, 1, 1]  # the long prompt needs two rows
    for example in (0, 1):
        targets = [t for r in rows if r.example == example for t in r.targets]
        assert sorted((j, tok) for _, tok, j in targets) == sorted(
            (j, tok) for j, ids in enumerate(labels) for tok in ids
        )
    first = rows[0]
    # single-token label 0 adds no input; the last token of each label is never an input
    assert first.input_ids == [1, 2, 3, 8, 10, 11, 13, 14, 15]
    assert first.segments == [1, 1, 1, 2, 3, 3, 4, 4, 4]
    assert (2, 7, 0) in first.targets and (2, 8, 1) in first.targets and (3, 9, 1) in first.targets


def _examples(task: ClassificationTask) -> list[dict]:
    texts = [
        "A short one.",
        "Beam me up, there is no intelligent life down here " * 3,
        "Free software is a matter of liberty, not price. " * 6,  # truncated at max_length 48
        "Eat dessert first.",
    ]
    return [{"text": t, "label": task.labels[i % len(task.labels)]} for i, t in enumerate(texts)]


@pytest.mark.parametrize(
    "overrides",
    [
        ["adapter.r=4"],
        ["adapter.type=prefix", "adapter.num_virtual_tokens=3"],
        ["adapter.spf.enabled=true"],
        ["model.dtype=bfloat16"],
    ],
    ids=["lora", "prefix", "spf", "bf16"],
)
def test_one_pass_equals_per_label_scores(make_job, overrides: list[str]) -> None:
    job = build_job(make_job(*overrides))
    # Move the adapter off its initialisation (LoRA's B starts at zero), so it takes part.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in job.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.05)
    task = ClassificationTask(job.task.tokenizer, LABELS, job.splits.prompt_template, 48)
    assert sorted(len(ids) for ids in task.label_ids)[-1] > 2
    examples = _examples(task)
    prompts = [task.prompt_ids(ex["text"]) for ex in examples]
    assert len(pack_rows(prompts, task.label_ids, 48)) > len(examples)  # some need two rows
    want = label_scores(job.model, task, examples, 3, CPU, one_pass=False)
    got = label_scores(job.model, task, examples, 3, CPU, one_pass=True)
    # bf16 rounds each matmul to 8 bits of mantissa; 0.006 measured for packed vs separate rows
    tol = TOL if "model.dtype=bfloat16" not in overrides else 0.02
    assert float((got - want).abs().max()) <= tol
    per_label = evaluate_classification(job.model, task, examples, 3, CPU, one_pass=False)
    assert evaluate_classification(job.model, task, examples, 3, CPU) == per_label


def test_one_pass_matches_on_the_real_split(make_job) -> None:
    """Same accuracy and macro-F1 on the validation split of fortunes-sample, and 1e-5 scores."""
    job = build_job(make_job("data.max_eval_examples=40"))
    examples = job.splits.validation
    want = label_scores(job.model, job.task, examples, 8, CPU, one_pass=False)
    got = label_scores(job.model, job.task, examples, 8, CPU, one_pass=True)
    assert float((got - want).abs().max()) <= TOL
    assert len(set(want.argmax(dim=1).tolist())) > 1  # the predictions vary: a real comparison
