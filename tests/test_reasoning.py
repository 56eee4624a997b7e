"""Typed reasoning parts (LLaMA-Factory's v1 format, issue 23 item 15): rendered through the chat template's reasoning
field (`reasoning_content`) and trained with the answer, or refused clearly where the template has no such field."""

from __future__ import annotations

import pytest
from conftest import write_jsonl
from fixtures_tokenizers import CHATML, CHATML_REASONING, with_template

from lorafit.config import DataConfig, DataSource
from lorafit.data import load_source
from lorafit.data.formats import FieldMap, RowError, normalise
from lorafit.data.labels import IGNORE_INDEX, tokenize_conversation
from lorafit.errors import LorafitError

REASONING = "Ana is named first; 34 is her age."
ANSWER = '{"name": "Ana Lopez", "age": 34}'


def _v1_row(*turns) -> dict:
    """A LLaMA-Factory v1 row: every content a list of typed parts with a "value" key."""
    messages = [{"role": "user", "content": [{"type": "text", "value": "Ana Lopez is 34."}]},
                {"role": "assistant", "content": [{"type": "reasoning", "value": REASONING},
                                                  {"type": "text", "value": ANSWER}]}]
    return {"messages": messages + list(turns)}


def _source(path, **options) -> DataSource:
    return DataSource(path=str(path), fields={"part_text": "value"}, **options)


def _data(**options) -> DataConfig:
    return DataConfig(train=[DataSource(path="unused.jsonl")], **options)


def _trained(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_reasoning_parts_become_the_messages_reasoning_field():
    record = normalise(_v1_row(), "messages", FieldMap({"part_text": "value"}), "t.jsonl:1")
    assert record.messages[1] == {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING}
    assert "reasoning_content" not in record.messages[0]


def test_reasoning_is_rendered_by_the_template_and_trained_with_the_answer(tmp_path):
    tokenizer = with_template("chatml", CHATML_REASONING)
    path = write_jsonl(tmp_path / "v1.jsonl", [_v1_row()])
    [example] = load_source(_source(path), tokenizer, _data(), use_cache=False).examples
    assert _trained(tokenizer, example) == f"<think>\n{REASONING}\n</think>\n\n{ANSWER}<|im_end|>"
    messages = [{"role": "user", "content": "Ana Lopez is 34."},
                {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING}]
    assert example.input_ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]


def test_a_template_without_a_reasoning_field_refuses_the_row_clearly(tmp_path):
    tokenizer = with_template("chatml", CHATML)
    path = write_jsonl(tmp_path / "v1.jsonl", [_v1_row()])
    with pytest.raises(LorafitError) as info:
        load_source(_source(path), tokenizer, _data(), use_cache=False)
    message = info.value.render()
    assert (f"{path}:1: message 1 has a reasoning part and the chat template has no reasoning field (it never reads "
            "`reasoning_content`): the reasoning would be cut out of training") in message
    assert "Traceback" not in message
    # on_error: skip leaves such rows out, counted under their own reason.
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    path = write_jsonl(tmp_path / "mixed.jsonl", [plain, _v1_row()])
    loaded = load_source(_source(path, on_error="skip", max_skip_fraction=0.5), tokenizer, _data(), use_cache=False)
    assert loaded.stats.kept == 1 and loaded.stats.skipped == {"reasoning_unsupported": 1}


def test_reasoning_dropped_from_earlier_turns_needs_last_assistant():
    """The template renders reasoning only after the last user message (as Qwen3's does): with every answer trained,
    turn 1 changes once later turns follow (refused, saying what to do); with last_assistant the final answer and its
    reasoning are trained, the earlier answer is context without its reasoning, as at inference."""
    tokenizer = with_template("chatml", CHATML_REASONING)
    messages = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
                {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2", "reasoning_content": "R2"}]
    with pytest.raises(RowError) as info:
        tokenize_conversation(tokenizer, messages)
    assert info.value.reason == "template_history" and "data.train_on: last_assistant" in info.value.message
    example = tokenize_conversation(tokenizer, messages, train_on="last_assistant")
    assert _trained(tokenizer, example) == "<think>\nR2\n</think>\n\nA2<|im_end|>"
    assert "R1" not in tokenizer.decode(example.input_ids)


def test_a_supervised_turn_whose_reasoning_the_template_leaves_out_is_refused():
    # The template names the field but never renders it: the reasoning would be silently lost.
    tokenizer = with_template("chatml", CHATML + "{# reasoning_content is ignored here #}")
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning_content": "R"}]
    for train_on in ("all_assistant", "all"):
        with pytest.raises(RowError) as info:
            tokenize_conversation(tokenizer, messages, train_on=train_on)
        assert info.value.reason == "reasoning_unsupported"
        assert "does not render the reasoning of assistant turn 1" in info.value.message


def test_reasoning_in_a_user_turn_is_a_row_error():
    row = {"messages": [{"role": "user", "content": [{"type": "reasoning", "value": "hm"}, {"type": "text", "value": "Q"}]},
                        {"role": "assistant", "content": "A"}]}
    with pytest.raises(RowError) as info:
        normalise(row, "messages", FieldMap({"part_text": "value"}), "t.jsonl:1")
    assert info.value.message == "messages[0].content has a reasoning part in a user turn; only assistant turns carry reasoning"
