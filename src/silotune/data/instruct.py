"""Instruction tuning: render a conversation as prompt + response tokens, loss on the response only.

A record is ``{"messages": [...], "domain": ...}`` (see :mod:`silotune.data.instruct_files`); its
last message is the response, every earlier message is the prompt. Two renderings
(``data.instruct.template``):

- ``chat``: the tokenizer's own chat template. The prompt is the template applied to the earlier
  messages with the generation prompt (``<|im_start|>assistant\\n`` for SmolLM2); the response is
  what the full conversation adds after that, end-of-turn tokens included, so the model learns to
  stop. Both are tokenized without extra special tokens (the template writes its own).
- ``plain``: ``### System:\\n{system}\\n\\n`` (when there is one), then ``### User:\\n{content}\\n\\n``
  and ``### Assistant:\\n{content}\\n\\n`` for each earlier turn, then ``### Assistant:\\n``; the
  response is the content followed by the tokenizer's EOS token. The prompt gets the tokenizer's
  usual special tokens (a BOS for Llama-style tokenizers).

Truncation keeps the response: it is cut from the right to ``max_response_length`` tokens, then the
prompt from the left (keeping the special tokens the tokenizer puts first) to what the response
leaves of ``data.max_length`` (and to ``max_prompt_length``). A prompt on its own (generation,
multiple choice) gets what the longest response would leave. :meth:`InstructionTask.encode_all` logs one
line per split saying how many records were cut.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import PreTrainedTokenizerBase

from silotune.config.instruct import InstructConfig
from silotune.data.tasks import IGNORE_INDEX, Encoded
from silotune.errors import DataError

logger = logging.getLogger(__name__)

PLAIN_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
MC_INSTRUCTION = "Answer with the letter of the correct choice."
_SENTINEL = "\x00silotune-response\x00"


def render_plain(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The plain template (module docstring): one ``### Role:`` block per message."""
    text = "".join(f"{PLAIN_HEADERS[m['role']]}{m['content']}\n\n" for m in messages)
    return text + PLAIN_HEADERS["assistant"] if add_generation_prompt else text


def mc_user_message(question: str, choices: list[str]) -> str:
    """The user turn of a multiple-choice question: the question, lettered choices, the ask."""
    lines = [question] + [f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\n" + MC_INSTRUCTION


class InstructionTask:
    """Prompt -> response sequences with targets on the response tokens only."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, cfg: InstructConfig, max_length: int
    ) -> None:
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if cfg.template == "chat" and not has_chat:
            raise DataError(
                "data.instruct.template is chat but the model's tokenizer has no chat template; "
                "use auto or plain"
            )
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.max_length = max_length
        self.template = (
            "chat" if cfg.template == "chat" or (cfg.template == "auto" and has_chat) else "plain"
        )
        wanted = cfg.max_response_length or max_length // 2
        self.max_response = min(wanted, max_length - 1)
        # a training prompt may use all that its own response leaves; a prompt alone (generation,
        # multiple choice) what the longest response would leave
        self.max_prompt = min(cfg.max_prompt_length or max_length, max_length - 1)
        self.max_prompt_alone = min(self.max_prompt, max_length - self.max_response)
        self.stop_ids = self._stop_ids()

    # ------------------------------------------------------------------ rendering

    def _with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.cfg.system_prompt and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.cfg.system_prompt}, *messages]
        return messages

    def _chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return str(text)

    def render(self, messages: list[dict[str, str]]) -> tuple[str, str]:
        """``(prompt text, response text)`` of a conversation whose last message is the response."""
        messages = self._with_system(messages)
        context, reply = messages[:-1], messages[-1]["content"]
        if self.template == "plain":
            return render_plain(context, add_generation_prompt=True), reply
        prompt = self._chat(context, add_generation_prompt=True)
        full = self._chat(messages, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise DataError(
                "the tokenizer's chat template does not render the prompt as the start of the "
                "conversation, so the response cannot be told apart; use data.instruct.template plain"
            )
        return prompt, full[len(prompt) :]

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _stop_ids(self) -> list[int]:
        """Token ids that end a generated response: EOS, and the chat template's end of turn."""
        stop = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        if self.template == "chat":
            turn = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _SENTINEL}]
            after = self._chat(turn, add_generation_prompt=False).split(_SENTINEL, 1)[-1]
            ids = self._ids(after, special=False)
            if ids and ids[0] in self.tokenizer.all_special_ids and ids[0] not in stop:
                stop.append(ids[0])
        return stop

    # ------------------------------------------------------------------ token ids

    def _cut_prompt(self, ids: list[int], room: int) -> list[int]:
        """Keep the last `room` tokens, and the special tokens that lead the prompt (a BOS)."""
        if len(ids) <= room:
            return ids
        special = set(self.tokenizer.all_special_ids)
        lead = 0
        while lead < len(ids) and lead < room // 2 and ids[lead] in special:
            lead += 1
        return ids[:lead] + ids[len(ids) - (room - lead) :]

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt tokens of a conversation (its last message dropped), cut to fit."""
        prompt, _ = self.render(messages)
        return self._cut_prompt(
            self._ids(prompt, special=self.template == "plain"), self.max_prompt
        )

    def encode_parts(self, record: dict[str, Any]) -> tuple[Encoded, bool, bool]:
        """The training sequence of `record` and whether its prompt and its response were cut."""
        prompt_text, response_text = self.render(record["messages"])
        prompt = self._ids(prompt_text, special=self.template == "plain")
        response = self._ids(response_text, special=False)
        if self.template == "plain" and self.tokenizer.eos_token_id is not None:
            response.append(self.tokenizer.eos_token_id)
        cut_response = len(response) > self.max_response
        response = response[: self.max_response]
        room = min(self.max_prompt, self.max_length - len(response))
        cut_prompt = len(prompt) > room
        prompt = self._cut_prompt(prompt, room)
        labels = [IGNORE_INDEX] * len(prompt) + response
        return Encoded(prompt + response, labels), cut_prompt, cut_response

    def encode(self, record: dict[str, Any]) -> Encoded:
        """The training sequence: prompt then response; targets on the response only."""
        return self.encode_parts(record)[0]

    def encode_all(self, records: list[dict[str, Any]], split: str) -> list[Encoded]:
        """Encode every record; log once how many prompts and responses were cut."""
        encoded, prompts, responses = [], 0, 0
        for record in records:
            enc, cut_prompt, cut_response = self.encode_parts(record)
            encoded.append(enc)
            prompts += cut_prompt
            responses += cut_response
        if prompts or responses:
            logger.warning(
                "instruction %s: cut the prompt of %d and the response of %d of %d records to fit "
                "data.max_length %d (response at most %d tokens)",
                split,
                prompts,
                responses,
                len(records),
                self.max_length,
                self.max_response,
            )
        return encoded

    # ------------------------------------------------------------------ multiple choice

    def mc_prompt_parts(self, record: dict[str, Any]) -> tuple[list[int], bool]:
        """The prompt of a multiple-choice record, and whether it was cut to fit.

        Its answer is one letter, so the prompt may use all of ``data.max_length`` but one token
        (and at most ``max_prompt_length``); a longer one is cut from the left like any prompt.
        """
        user = {"role": "user", "content": mc_user_message(record["question"], record["choices"])}
        prompt, _ = self.render([user, {"role": "assistant", "content": "A"}])
        ids = self._ids(prompt, special=self.template == "plain")
        return self._cut_prompt(ids, self.max_prompt), len(ids) > self.max_prompt

    def mc_prompt_ids(self, record: dict[str, Any]) -> list[int]:
        """The prompt of a multiple-choice record (see `mc_prompt_parts`)."""
        return self.mc_prompt_parts(record)[0]

    def letter_ids(self, count: int) -> list[list[int]]:
        """Token ids of the answer letters ``A``, ``B``, ... (the first `count`)."""
        return [self._ids(chr(ord("A") + i), special=False) for i in range(count)]
