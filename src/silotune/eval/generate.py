"""`silotune generate`: talk to the model a run produced, with the prompt rendering it trained on.

The prompt goes through the job's instruction template (`data.instruct`: the tokenizer's chat
template, or the plain one, and the system prompt), and decoding follows the job's `eval` keys
(`max_new_tokens`, `temperature`, `top_p`), so what you read here is what the instruction
evaluation scored. One prompt is streamed token by token; a file of prompts is decoded in batches
and written as one JSON line per record.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TextStreamer

from silotune.adapters.peft_adapters import load_adapter
from silotune.config import JobConfig
from silotune.data.files import read_rows
from silotune.data.instruct import InstructionTask
from silotune.errors import ConfigError, DataError
from silotune.eval.instruct import generate_responses
from silotune.models.loading import LoadedModel, load_model


class Generator:
    """A job's model (+ adapter) and instruction template, ready to answer prompts."""

    def __init__(self, cfg: JobConfig, adapter_dir: Path | None) -> None:
        loaded: LoadedModel = load_model(
            cfg.model.name, cfg.model.device, cfg.model.dtype, seed=cfg.train.seed
        )
        self.device = loaded.device
        self.model = loaded.model
        if adapter_dir is not None:
            self.model = load_adapter(loaded.model, adapter_dir).to(loaded.device)
        self.model.eval()
        self.cfg = cfg
        self.task = InstructionTask(loaded.tokenizer, cfg.data.instruct, cfg.data.max_length)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation that ends with the user's turn, ready for the reply."""
        return self.task.prompt_ids([*messages, {"role": "assistant", "content": ""}])

    def stream(self, text: str, write: Callable[[str], Any]) -> str:
        """Answer one user message, passing each decoded piece to `write`; return the answer."""
        ids = torch.tensor(
            [self.prompt_ids([{"role": "user", "content": text}])], device=self.device
        )
        pieces: list[str] = []

        class _Collect(TextStreamer):
            def on_finalized_text(self, piece: str, stream_end: bool = False) -> None:
                pieces.append(piece)
                write(piece)

        streamer = _Collect(self.task.tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.no_grad(), _seeded(self.cfg.train.seed, self.device):
            self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                streamer=streamer,
                pad_token_id=self.task.tokenizer.pad_token_id,
                **self.decoding(),
            )
        return "".join(pieces).strip()

    def answer_all(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        """Answers to many conversations, decoded in batches (same decoding as the evaluation)."""
        prompts = [self.prompt_ids(messages) for messages in conversations]
        return generate_responses(
            self.model,
            self.task,
            prompts,
            self.cfg.eval,
            self.cfg.train.eval_batch_size,
            self.device,
            seed=self.cfg.train.seed,
        )

    def decoding(self) -> dict[str, Any]:
        ev = self.cfg.eval
        options: dict[str, Any] = {
            "max_new_tokens": ev.max_new_tokens,
            "do_sample": ev.temperature > 0,
            "eos_token_id": self.task.stop_ids or None,
        }
        if ev.temperature > 0:
            options.update(temperature=ev.temperature, top_p=ev.top_p)
        return options


class _seeded:
    """Seed torch for sampled decoding without touching the caller's random state."""

    def __init__(self, seed: int, device: torch.device) -> None:
        devices = [device.index or 0] if device.type == "cuda" else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._seed = seed

    def __enter__(self) -> None:
        self._fork.__enter__()
        torch.manual_seed(self._seed)

    def __exit__(self, *exc: object) -> None:
        self._fork.__exit__(*exc)


def read_prompts(path: Path) -> list[list[dict[str, str]]]:
    """Conversations from a JSONL/JSON/CSV/Parquet file, one per row.

    A row is ``{"instruction", "input"?}`` (as in training data, without ``output``) or
    ``{"messages": [...]}`` ending with a user turn. Anything else raises one error naming the row.
    """
    conversations = []
    for number, row in enumerate(read_rows(path), start=1):
        conversations.append(_conversation(path, number, row))
    if not conversations:
        raise DataError(f"{path} holds no prompts")
    return conversations


def _conversation(path: Path, number: int, row: dict[str, Any]) -> list[dict[str, str]]:
    where = f"row {number}"
    messages = row.get("messages")
    if messages is not None:
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)
        ):
            raise DataError(f"{path} {where}: 'messages' must be a list of {{role, content}}")
        if messages[-1]["role"] != "user":
            raise DataError(f"{path} {where}: the last message must be the user's, to answer it")
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"{path} {where}: needs a non-empty 'instruction' (or 'messages')")
    extra = row.get("input")
    text = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
    return [{"role": "user", "content": text}]


def check_job(cfg: JobConfig) -> None:
    if cfg.data.task != "instruction":
        raise ConfigError(
            f"silotune generate needs a job with data.task instruction (this one is "
            f"{cfg.data.task}); classification jobs are scored with silotune eval"
        )


def generate_lines(gen: Generator, path: Path) -> Iterator[str]:
    """One JSON line per prompt of `path`: the prompt's last user turn and the answer."""
    conversations = read_prompts(path)
    for messages, answer in zip(conversations, gen.answer_all(conversations), strict=True):
        yield json.dumps({"prompt": messages[-1]["content"], "response": answer})
