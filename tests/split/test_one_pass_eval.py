"""One-pass label scoring through the remote trunk equals the centralized per-label scores."""

from __future__ import annotations

import pytest
import torch

from silotune.errors import FrameError
from silotune.eval.evaluate import label_scores
from silotune.split.trunk import check_activation
from silotune.train.job import build_job
from silotune.transport.frames import Frame
from tests.split.conftest import open_silo, silo_end, split_cfg, trunk_server

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "model,adapter", [("tiny-llama", "lora"), ("tiny-llama", "prefix"), ("gpt2", "lora")]
)
def test_split_one_pass_scores_equal_centralized_per_label(model, adapter, keys_dir, gpt2_dir):
    name = str(gpt2_dir) if model == "gpt2" else model
    cfg = split_cfg(name, {"eval_batch_size": 4})
    if adapter == "prefix":  # PEFT initialises the prefix at random: it changes every score
        prefix = {"type": "prefix", "num_virtual_tokens": 3}
        cfg = cfg.model_copy(update={"adapter": cfg.adapter.model_copy(update=prefix)})
    job = build_job(cfg.model_copy(update={"mode": "centralized"}))
    examples = job.splits.validation[:12]
    want = label_scores(job.model, job.task, examples, 4, CPU, one_pass=False)
    assert max(len(ids) for ids in job.task.label_ids) > 1  # branches really are packed
    with trunk_server(cfg, keys_dir) as (_, connect_fn):
        end = silo_end(cfg, open_silo(connect_fn, keys_dir, "silo-0"))
        end.model.eval()
        got = label_scores(end.model, job.task, examples, 4, CPU, one_pass=True)
        end.link.finish()
    assert float((got - want).abs().max()) <= 1e-5


def _frame(mask: torch.Tensor, train: bool) -> Frame:
    hidden = torch.zeros(*mask.shape, 8)
    return Frame("forward", 0, "silo-0", {"hidden": hidden, "mask": mask}, {"train": train})


def test_trunk_takes_segment_ids_in_evaluation_frames_only():
    packed = torch.tensor([[1, 1, 2, 2, 3, 0]])
    hidden, mask = check_activation(_frame(packed, train=False), 8, 16)
    assert mask.tolist() == packed.tolist()
    with pytest.raises(FrameError, match="0..1"):
        check_activation(_frame(packed, train=True), 8, 16)
    with pytest.raises(FrameError, match="at least one 1 per row"):  # a row without a prompt
        check_activation(_frame(torch.tensor([[2, 2, 0]]), train=False), 8, 16)
    with pytest.raises(FrameError):
        check_activation(_frame(torch.tensor([[1, -1, 0]]), train=False), 8, 16)
