"""`silotune generate` answers with the template and decoding the job trained and scored with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from silotune.config import AdapterConfig, config_from_dict
from silotune.errors import DataError
from silotune.eval.generate import Generator, read_prompts
from silotune.models.loading import export_model
from tests.conftest import assert_clean_error, save_random_adapter

JOB = {
    "mode": "centralized",
    "model": "tiny-llama",
    "adapter": {"type": "lora", "r": 4},
    "data": {"dataset": "dictionaries-sample", "task": "instruction", "max_length": 96},
    "eval": {"max_new_tokens": 12},
    "train": {"seed": 0},
}
QUESTION = "Define the term: kernel"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A LoRA adapter with random (non-zero) weights, so it changes what the model says."""
    folder = tmp_path_factory.mktemp("adapter")
    return save_random_adapter(folder, AdapterConfig(r=4), scale=0.3, seed=7)


def write_job(folder: Path, **changes: object) -> Path:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({**JOB, **changes, "output_dir": str(folder / "run")}))
    return path


def plain_peft_answer(tmp_path: Path, adapter_dir: Path, question: str) -> str:
    """What plain transformers + PEFT say, with the plain template written out by hand."""
    base_dir = export_model("tiny-llama", tmp_path / "base", seed=0)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    prompt = f"### User:\n{question}\n\n### Assistant:\n"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.eval().generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_generate_streams_what_plain_peft_generates(tmp_path, adapter_dir, main_in_process) -> None:
    job = write_job(tmp_path)
    result = main_in_process(
        "generate", str(job), "--adapter", str(adapter_dir), "--prompt", QUESTION, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    want = plain_peft_answer(tmp_path, adapter_dir, QUESTION)
    assert want  # the random adapter says something...
    assert result.stdout.strip() == want  # ...and silotune generate says exactly that


def test_the_adapter_changes_the_answer(tmp_path, adapter_dir) -> None:
    cfg = config_from_dict({**JOB, "output_dir": str(tmp_path / "run")}, [])
    tuned = Generator(cfg, adapter_dir).stream(QUESTION, write=lambda _: None)
    untuned = Generator(cfg, None).stream(QUESTION, write=lambda _: None)
    assert tuned != untuned


def test_a_file_of_prompts_gives_one_json_line_each(tmp_path, adapter_dir, main_in_process) -> None:
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"instruction": QUESTION},
        {"messages": [{"role": "user", "content": "Define the term: daemon"}]},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = write_job(tmp_path)
    args = ("generate", str(job), "--adapter", str(adapter_dir))
    result = main_in_process(*args, "--file", str(prompts), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [line["prompt"] for line in lines] == [QUESTION, "Define the term: daemon"]
    # batched decoding of a file answers as streaming one prompt does
    single = main_in_process(*args, "--prompt", QUESTION, cwd=tmp_path)
    assert lines[0]["response"] == single.stdout.strip()


def test_bad_prompt_rows_name_the_row(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "fine"}\n{"output": "no question"}\n')
    with pytest.raises(DataError, match="bad.jsonl row 2: needs a non-empty 'instruction'"):
        read_prompts(bad)
    ends_with_reply = tmp_path / "reply.jsonl"
    ends_with_reply.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
        )
        + "\n"
    )
    with pytest.raises(DataError, match="row 1: the last message must be the user's"):
        read_prompts(ends_with_reply)


def test_usage_errors_are_one_line(tmp_path, adapter_dir, main_in_process) -> None:
    job = write_job(tmp_path)
    neither = main_in_process("generate", str(job), cwd=tmp_path)
    assert_clean_error(neither, "pass --prompt TEXT or --file F")
    classify = write_job(tmp_path, data={"dataset": "fortunes-sample", "task": "classification"})
    refused = main_in_process("generate", str(classify), "--prompt", "hi", cwd=tmp_path)
    assert_clean_error(refused, "needs a job with data.task instruction")
