"""Tests for silotune.data.instruct: plain and chat rendering, response-only targets, truncation."""

from __future__ import annotations

import logging

import pytest

from silotune.config.instruct import InstructConfig
from silotune.data.instruct import InstructionTask, mc_user_message, render_plain
from silotune.data.tasks import IGNORE_INDEX, make_task
from silotune.errors import DataError
from silotune.models.presets import tiny_llama_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def conversation(answer: str = "A stack is a LIFO list.", question: str = "What is a stack?"):
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
        "domain": "computing",
    }


@pytest.fixture(scope="module")
def tok():
    return tiny_llama_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    """The tiny tokenizer with ChatML special tokens and a chat template, like SmolLM2's."""
    tokenizer = tiny_llama_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def test_plain_template_text() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"},
    ]
    assert render_plain(messages, add_generation_prompt=True) == (
        "### System:\nBe brief.\n\n### User:\nHi?\n\n### Assistant:\nHello.\n\n"
        "### User:\nBye?\n\n### Assistant:\n"
    )


def test_plain_encoding_targets_the_response_and_eos_only(tok) -> None:
    task = InstructionTask(tok, InstructConfig(template="plain"), max_length=128)
    assert task.template == "plain"  # auto falls back to plain: no chat template
    enc = task.encode(conversation())
    prompt = "### User:\nWhat is a stack?\n\n### Assistant:\n"
    prompt_ids = tok(prompt)["input_ids"]
    response_ids = tok("A stack is a LIFO list.", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == prompt_ids + response_ids + [tok.eos_token_id]
    assert enc.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tok.eos_token_id]


def test_system_prompt_goes_first_unless_the_record_has_one(tok) -> None:
    task = InstructionTask(tok, InstructConfig(system_prompt="Be brief."), max_length=128)
    prompt, response = task.render(conversation()["messages"])
    assert prompt.startswith("### System:\nBe brief.\n\n### User:\n")
    assert response == "A stack is a LIFO list."
    own = [{"role": "system", "content": "Mine."}, *conversation()["messages"]]
    assert task.render(own)[0].startswith("### System:\nMine.\n\n")


def test_chat_template_is_used_when_the_tokenizer_has_one(chat_tok) -> None:
    task = InstructionTask(chat_tok, InstructConfig(), max_length=128)
    assert task.template == "chat"
    prompt, response = task.render(conversation()["messages"])
    assert prompt == "<|im_start|>user\nWhat is a stack?<|im_end|>\n<|im_start|>assistant\n"
    assert response == "A stack is a LIFO list.<|im_end|>\n"
    enc = task.encode(conversation())
    n_prompt = len(chat_tok(prompt, add_special_tokens=False)["input_ids"])
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    assert end in enc.labels  # the model learns to end its turn
    assert task.stop_ids == [chat_tok.eos_token_id, end]  # and generation stops there


def test_template_choice_by_config(tok, chat_tok) -> None:
    assert InstructionTask(chat_tok, InstructConfig(template="plain"), 64).template == "plain"
    with pytest.raises(DataError, match="has no chat template; use auto or plain"):
        InstructionTask(tok, InstructConfig(template="chat"), 64)
    assert make_task(tok, "instruction", [], "", 64).template == "plain"


def test_chat_template_that_does_not_extend_the_prompt_is_refused(chat_tok) -> None:
    odd = tiny_llama_tokenizer()
    odd.chat_template = "{{ messages | length }}{% if add_generation_prompt %}?{% endif %}"
    task = InstructionTask(odd, InstructConfig(template="chat"), 64)
    with pytest.raises(DataError, match="cannot be told apart; use data.instruct.template plain"):
        task.encode(conversation())


def test_truncation_keeps_the_response_and_cuts_the_prompt_from_the_left(tok) -> None:
    question = " ".join(f"w{i}" for i in range(200)) + " LASTWORD?"
    task = InstructionTask(tok, InstructConfig(), max_length=48)
    enc, cut_prompt, cut_response = task.encode_parts(conversation(question=question))
    assert (cut_prompt, cut_response) == (True, False)
    assert len(enc.input_ids) == 48
    response = tok("A stack is a LIFO list.", add_special_tokens=False)["input_ids"]
    assert enc.labels[-len(response) - 1 :] == response + [tok.eos_token_id]
    assert tok.decode(enc.input_ids).endswith(
        "LASTWORD?\n\n### Assistant:\nA stack is a LIFO list.<|endoftext|>"
    )


def test_truncation_caps_the_response_and_leaves_the_prompt(tok) -> None:
    answer = " ".join(f"a{i}" for i in range(100))
    task = InstructionTask(tok, InstructConfig(max_response_length=10), max_length=64)
    enc, cut_prompt, cut_response = task.encode_parts(conversation(answer=answer))
    assert (cut_prompt, cut_response) == (False, True)
    targets = [t for t in enc.labels if t != IGNORE_INDEX]
    assert targets == tok(answer, add_special_tokens=False)["input_ids"][:10]  # the start kept


def test_max_prompt_length_caps_the_prompt(tok) -> None:
    task = InstructionTask(tok, InstructConfig(max_prompt_length=12), max_length=128)
    question = " ".join(f"w{i}" for i in range(50))
    enc = task.encode(conversation(question=question))
    assert enc.labels.count(IGNORE_INDEX) == 12
    assert len(task.prompt_ids(conversation(question=question)["messages"])) == 12


def test_encode_all_logs_the_cut_records_once(tok, caplog) -> None:
    task = InstructionTask(tok, InstructConfig(max_response_length=4), max_length=32)
    long_q = " ".join(f"w{i}" for i in range(60))
    records = [conversation(), conversation(question=long_q), conversation(answer="x " * 30)]
    with caplog.at_level(logging.WARNING, logger="silotune.data.instruct"):
        encoded = task.encode_all(records, "train")
    assert len(encoded) == 3 and all(len(e.input_ids) <= 32 for e in encoded)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    # every response is longer than 4 tokens, so all three are cut; one long prompt is cut
    assert "instruction train: cut the prompt of 1 and the response of 3 of 3 records" in lines[0]


def test_multiple_choice_prompt_and_letters(tok) -> None:
    task = InstructionTask(tok, InstructConfig(), max_length=128)
    record = {"question": "2+2?", "choices": ["3", "4"], "answer": "B"}
    text = tok.decode(task.mc_prompt_ids(record))
    assert text == (
        "### User:\n2+2?\nA. 3\nB. 4\nAnswer with the letter of the correct choice.\n\n"
        "### Assistant:\n"
    )
    assert mc_user_message("Q", ["x", "y", "z"]).splitlines()[1:4] == ["A. x", "B. y", "C. z"]
    assert [tok.decode(ids) for ids in task.letter_ids(4)] == ["A", "B", "C", "D"]


def test_multiple_choice_prompts_may_use_the_whole_length(tok) -> None:
    task = InstructionTask(tok, InstructConfig(max_response_length=60), max_length=64)
    record = {"question": "Which?", "choices": ["x", "y"], "answer": "A"}
    ids, cut = task.mc_prompt_parts(record)
    assert not cut and len(ids) > 64 - 60  # more than a training prompt's room
    long = {**record, "choices": ["x " * 40, "y " * 40]}
    ids, cut = task.mc_prompt_parts(long)
    assert cut and len(ids) == 63  # one token left for the answer letter
