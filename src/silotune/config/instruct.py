"""The `data.instruct:` and `eval:` sections: prompt rendering of instruction tuning, generation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InstructConfig(_Strict):
    """How `task: instruction` renders a record into prompt and response tokens (docs/instruct.md)."""

    template: Literal["auto", "chat", "plain"] = Field(
        "auto",
        description="chat = the tokenizer's chat template, plain = silotune's '### User:' template "
        "(docs/instruct.md), auto = chat when the tokenizer has a chat template, else plain",
    )
    system_prompt: str | None = Field(
        None, description="system message put first in records that have none; null = none"
    )
    max_prompt_length: int | None = Field(
        None,
        gt=0,
        description="prompt tokens kept (cut from the left, leading special tokens kept); "
        "null = whatever the response leaves of data.max_length",
    )
    max_response_length: int | None = Field(
        None,
        gt=0,
        description="response tokens kept (cut from the right); null = half of data.max_length. "
        "Prompt + response never exceed data.max_length; the prompt is cut first",
    )


class EvalConfig(_Strict):
    """Evaluation of generated text (task instruction): decoding and how much of it to do."""

    max_new_tokens: int = Field(64, gt=0, description="tokens generated per prompt")
    temperature: float = Field(
        0.0, ge=0, description="0 = greedy decoding; above 0 = sampling at this temperature"
    )
    top_p: float = Field(
        1.0, gt=0, le=1, description="nucleus sampling mass (used only when temperature > 0)"
    )
    generation_examples: int = Field(
        16,
        ge=0,
        description="periodic validation generates for at most this many examples (loss and "
        "perplexity always use all); 0 = generation metrics only at the final test evaluation",
    )
    multiple_choice: bool = Field(
        True,
        description="at the test evaluation, also score the dataset's multiple_choice file "
        "(when it has one) by the log-likelihood of each answer letter",
    )
