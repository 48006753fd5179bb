"""Instruction tuning in split mode: steps equal centralized ones, the test runs on the silo alone."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from silotune.config import JobConfig
from silotune.eval.runner import evaluate_job
from silotune.models.loading import export_model
from silotune.split.silo import TrunkLink
from silotune.train.job import build_job
from silotune.train.loop import make_optimizer, make_scheduler
from tests.split.conftest import (
    open_silo,
    paired_step,
    serve_and_join,
    silo_end,
    split_cfg,
    trunk_server,
)

TOL = 1e-5
INSTRUCT = {"dataset": "dictionaries-sample", "task": "instruction", "max_length": 96}


def instruct_cfg(model: str = "tiny-llama", **split: object) -> JobConfig:
    cfg = split_cfg(model, train={"max_steps": 2, "batch_size": 2}, **split)
    data = cfg.data.model_copy(update={**INSTRUCT, "max_eval_examples": 3})
    evaluation = cfg.eval.model_copy(update={"max_new_tokens": 4})
    return cfg.model_copy(update={"data": data, "eval": evaluation})


def test_split_instruction_steps_equal_centralized_steps(keys_dir) -> None:
    cfg = instruct_cfg(server_mode="client-batching")
    job = build_job(cfg.model_copy(update={"mode": "centralized"}))
    optimizer = make_optimizer(job.model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    labels = job.stream.examples[0].labels
    assert labels[0] == -100 and labels[-1] != -100  # the loss is the response's only
    with trunk_server(cfg, keys_dir) as (_, connect_fn):
        end = silo_end(cfg, open_silo(connect_fn, keys_dir, "silo-0"))
        for step in range(2):
            want, got = paired_step(job, optimizer, scheduler, end, cfg, step)
            assert got.loss == pytest.approx(want.loss, abs=TOL)
            assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-5)
        end.link.finish()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_split_instruction_job_trains_and_scores_test_on_the_silo(
    keys_dir, tls_dir, tmp_path, monkeypatch
) -> None:
    # every evaluation frame a silo sends the coordinator (train=False forwards), per silo
    sent_for_eval: dict[int, int] = {}
    forward = TrunkLink.forward

    def counting(link, hidden, mask, train):
        if not train:
            sent_for_eval[id(link)] = sent_for_eval.get(id(link), 0) + 1
        return forward(link, hidden, mask, train)

    monkeypatch.setattr(TrunkLink, "forward", counting)
    address = f"127.0.0.1:{_free_port()}"
    # a saved folder, not the seeded preset: threads building tiny-llama at once would share
    # torch's global RNG (real silos are processes), and the test compares weights exactly
    common = {
        "model": str(export_model("tiny-llama", tmp_path / "tiny-llama")),
        "address": address,
        "keys_dir": keys_dir,
        "tls_dir": tls_dir,
        "silos": 2,
    }
    coordinator = instruct_cfg(**common)
    coordinator.output_dir = tmp_path / "coordinator"
    silos = []
    for i in range(2):
        cfg = instruct_cfg(**common).model_copy(
            update={"train": instruct_cfg().train.model_copy(update={"eval_every": 1})}
        )
        cfg.output_dir = tmp_path / f"silo-{i}"
        silos.append(cfg)
    results = serve_and_join(coordinator, silos)
    # only the two periodic validations (3 records, one batch each) reached the coordinator: the
    # test evaluation, its generation and multiple choice sent nothing
    assert sorted(sent_for_eval.values()) == [2, 2], sent_for_eval
    frames_seen = results["coordinator"]["trunk_steps"]
    assert frames_seen == 2
    test = results[0]["test"]
    assert {"loss", "rouge_l", "exact_match", "mc_accuracy"} <= set(test)
    assert test["generated"] == 3 and test["mc_examples"] == 3
    records = [
        json.loads(x) for x in (tmp_path / "silo-0" / "metrics.jsonl").read_text().split("\n") if x
    ]
    validation = [r for r in records if r.get("split") == "validation"]
    # periodic validation went through the split model: loss and perplexity, no generated text
    assert [r["step"] for r in validation] == [1, 2]
    assert all("loss" in r and "rouge_l" not in r for r in validation)
    # the test scores are those of the silo's own copy: base + the whole adapter it saved
    central = silos[0].model_copy(update={"mode": "centralized"})
    again = evaluate_job(central, tmp_path / "silo-0" / "adapter", "test", progress=False)
    for key in ("loss", "rouge_l", "exact_match", "mc_accuracy"):
        assert again[key] == pytest.approx(test[key], abs=1e-6), key
    assert torch.isfinite(torch.tensor(test["loss"]))
