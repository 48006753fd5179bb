"""Centralized training and `silotune eval` on the instruction task (tiny-llama, bundled sample)."""

from __future__ import annotations

import json
from pathlib import Path

from silotune.train.run_folder import METRICS_FILE
from silotune.train.trainer import train_centralized
from tests.conftest import assert_clean_error

INSTRUCT = [
    "data.dataset=dictionaries-sample",
    "data.task=instruction",
    "data.max_length=64",
    "data.max_eval_examples=4",
    "eval.max_new_tokens=4",
    "eval.generation_examples=2",
]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]


def test_periodic_evaluation_is_cheap_and_the_test_one_complete(make_job) -> None:
    cfg = make_job(*INSTRUCT, "train.max_steps=4", "train.eval_every=2")
    summary = train_centralized(cfg, progress=False)
    validation = [r for r in metrics(cfg.output_dir) if r.get("split") == "validation"]
    assert [r["step"] for r in validation] == [2, 4]
    # periodic evaluation: loss on every example, generation on eval.generation_examples only
    assert all(r["examples"] == 4 and r["generated"] == 2 for r in validation)
    assert "mc_accuracy" not in validation[0]
    test = summary["test"]
    assert test["generated"] == 4 and test["mc_examples"] == 4 and 0 <= test["mc_accuracy"] <= 1


def test_training_learns_the_responses(make_job, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {"instruction": f"Name colour {i}.", "output": colour}
        for i, colour in enumerate(["red", "green", "blue", "yellow"])
    ]
    for split in ("train", "validation", "test"):
        lines = [json.dumps(r) + "\n" for r in rows]
        (data / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    cfg = make_job(
        *INSTRUCT, f"data.dataset={data}", "train.max_steps=40", "train.eval_every=40",
        "train.lr=2e-2", "adapter.r=8",
    )  # fmt: skip
    before = train_centralized(
        cfg.model_copy(
            update={"train": cfg.train.model_copy(update={"max_steps": 1, "eval_every": 1})}
        ),
        progress=False,
    )["test"]["loss"]
    after = train_centralized(cfg, progress=False, overwrite=True)["test"]
    assert after["loss"] < before - 1.0, (before, after)
    assert after["exact_match"] >= 0.5  # generation gives back the trained responses


def test_cli_eval_scores_a_trained_adapter(make_job, tmp_path: Path, main_in_process) -> None:
    cfg = make_job(*INSTRUCT, "train.max_steps=2", "train.eval_every=2")
    train_centralized(cfg, progress=False)
    recipe = tmp_path / "job.yaml"
    recipe.write_text((cfg.output_dir / "config.yaml").read_text(), encoding="utf-8")
    result = main_in_process(
        "eval", str(recipe), "--adapter", str(cfg.output_dir / "adapter"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["split"] == "test" and {"rouge_l", "exact_match", "mc_accuracy"} <= set(scores)
    bad = main_in_process(
        "eval", str(recipe), "--set", "data.dataset=fortunes-sample", cwd=tmp_path
    )
    assert_clean_error(bad, "holds no instruction records")


def test_a_bad_record_is_one_cli_line_naming_file_and_line(tmp_path: Path, main_in_process) -> None:
    data = tmp_path / "data"
    data.mkdir()
    good = json.dumps({"instruction": "a", "output": "b"})
    (data / "train.jsonl").write_text(f"{good}\n{good}\n", encoding="utf-8")
    (data / "validation.jsonl").write_text(f"{good}\n", encoding="utf-8")
    (data / "test.jsonl").write_text(f'{good}\n{{"instruction": "a", "output": ""}}\n', "utf-8")
    recipe = tmp_path / "job.yaml"
    recipe.write_text(f"data: {{dataset: {data}, task: instruction}}\n", encoding="utf-8")
    result = main_in_process("eval", str(recipe), cwd=tmp_path)
    assert_clean_error(result, f"{data / 'test.jsonl'} line 2: 'output' is empty.")
