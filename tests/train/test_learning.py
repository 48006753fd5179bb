"""Training learns: on a task a small model can learn, accuracy goes far beyond chance.

Each text hides one cue word among filler words; the label is the cue's colour. Chance is 0.5;
the untrained tiny model sits near it; 60 LoRA steps must reach at least 0.9 on held-out texts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from silotune.config import config_from_dict
from silotune.eval.runner import evaluate_job
from silotune.train.trainer import train_centralized

FILLER = "the a of and to in is it that was for on are with as at be this have from or one".split()
CUES = {"red": ["apple", "cherry", "ruby"], "green": ["lime", "grass", "leaf"]}


def write_cue_task(folder: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for split, n in (("train", 400), ("validation", 20), ("test", 80)):
        rows = []
        for _ in range(n):
            label = rng.choice(sorted(CUES))
            words = [rng.choice(FILLER) for _ in range(8)]
            words.insert(rng.randrange(9), rng.choice(CUES[label]))
            rows.append({"text": " ".join(words), "label": label})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
def test_lora_training_beats_chance_by_far_on_a_learnable_task(tmp_path: Path) -> None:
    write_cue_task(tmp_path / "data")
    cfg = config_from_dict(
        {
            "mode": "centralized",
            "model": "tiny-llama",
            "adapter": {"type": "lora", "r": 8},
            "data": {"dataset": str(tmp_path / "data"), "task": "classification", "max_length": 32},
            "train": {"max_steps": 60, "batch_size": 8, "lr": 5e-3, "seed": 0, "eval_every": 1000},
            "output_dir": str(tmp_path / "run"),
        }
    )
    before = evaluate_job(cfg, None, progress=False)["accuracy"]
    after = train_centralized(cfg, progress=False)["test"]["accuracy"]
    assert before <= 0.65, before  # near chance (0.5) untrained
    assert after >= 0.9, after
