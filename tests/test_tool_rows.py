"""Tool use rows (OpenAI `tool_calls` / `tool`, ShareGPT `function_call` / `observation`): rendered with the
template's own tool support, the calls supervised and the tool results not; refused clearly where the template
has no tool support."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl
from fixtures_tokenizers import CHATML, family, with_template

from lorafit.config import DataConfig, DataSource
from lorafit.data import load_source
from lorafit.data.labels import IGNORE_INDEX
from lorafit.errors import LorafitError

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}
OPENAI_ROW = {
    "tools": [TOOL],
    "messages": [
        {"role": "user", "content": "What is the weather in Paris today?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"location": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "It is sunny and 21 degrees."},
    ],
}
SHAREGPT_ROW = {
    "tools": json.dumps([TOOL]),
    "conversations": [
        {"from": "human", "value": "What is the weather in Paris today?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"location": "Paris"}})},
        {"from": "observation", "value": '{"temperature": 21}'},
        {"from": "gpt", "value": "It is sunny and 21 degrees."},
    ],
}


def _data() -> DataConfig:
    return DataConfig(train=[DataSource(path="unused.jsonl")])


def _supervised_texts(tokenizer, example) -> list[str]:
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def test_openai_tool_calls_are_rendered_by_the_template_and_the_call_is_supervised(tmp_path):
    tokenizer, _ = family("chatml")  # Qwen2.5's template, with its tool branches
    path = write_jsonl(tmp_path / "tools.jsonl", [OPENAI_ROW])
    [example] = load_source(DataSource(path=str(path)), tokenizer, _data(), use_cache=False).examples
    text = tokenizer.decode(example.input_ids)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text  # the tool list, from `tools`
    assert "<tool_response>\n{\"temperature\": 21}\n</tool_response>" in text
    assert _supervised_texts(tokenizer, example) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call><|im_end|>',
        "It is sunny and 21 degrees.<|im_end|>",
    ]


def test_sharegpt_function_call_and_observation_give_the_same_example(tmp_path):
    tokenizer, _ = family("chatml")
    openai = load_source(DataSource(path=str(write_jsonl(tmp_path / "a.jsonl", [OPENAI_ROW]))), tokenizer, _data(),
                         use_cache=False).examples[0]
    sharegpt = load_source(DataSource(path=str(write_jsonl(tmp_path / "b.jsonl", [SHAREGPT_ROW]))), tokenizer, _data(),
                           use_cache=False).examples[0]
    assert (sharegpt.input_ids, sharegpt.labels) == (openai.input_ids, openai.labels)


def test_a_template_without_tool_support_is_refused_naming_the_row_and_the_way_out(tmp_path):
    tokenizer = with_template("chatml", CHATML)  # renders `content` only: the call would vanish
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    path = write_jsonl(tmp_path / "tools.jsonl", [plain, OPENAI_ROW])
    with pytest.raises(LorafitError) as info:
        load_source(DataSource(path=str(path)), tokenizer, _data(), use_cache=False)
    message = info.value.render()
    assert f"{path}:2: the chat template does not render tool use (the tool definition 'get_weather' is missing" in message
    assert "on_error: skip" in message and "Traceback" not in message

    loaded = load_source(DataSource(path=str(path), on_error="skip", max_skip_fraction=0.5), tokenizer, _data(),
                         use_cache=False)
    assert len(loaded.examples) == 1 and loaded.stats.skipped == {"tools_unsupported": 1}
    assert [(r["where"], r["reason"]) for r in loaded.skipped_rows] == [(f"{path}:2", "tools_unsupported")]


def test_a_tool_result_without_a_call_is_a_row_error(tmp_path):
    tokenizer, _ = family("chatml")
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "{}"},
                        {"role": "assistant", "content": "Hello."}]}
    with pytest.raises(LorafitError, match=r"tools.jsonl:1: message 1 is a tool result that follows no tool call"):
        load_source(DataSource(path=str(write_jsonl(tmp_path / "tools.jsonl", [row]))), tokenizer, _data(), use_cache=False)
