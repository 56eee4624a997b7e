"""Every shipped format example is read, normalised and labelled token by token; broken files name the place."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import REPO
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.config import DataConfig, DataSource
from lorafit.data import load_source
from lorafit.data.labels import IGNORE_INDEX
from lorafit.errors import LorafitError

FORMATS = REPO / "examples" / "data" / "formats"
BROKEN = REPO / "tests" / "data" / "broken"
SYS = "Extract name and age as JSON."
PEOPLE = [("Ana Lopez", 34, "Lisbon", "nurse"), ("Tom Berg", 51, "Oslo", "baker"), ("Mei Chen", 27, "Taipei", "pilot")]


def _q(p):
    return f"{p[0]}, {p[1]}, is a {p[3]} in {p[2]}."


def _a(p):
    return json.dumps({"name": p[0], "age": p[1]})


def _chat(*turns, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return messages


# What each shipped file must turn into, written out by hand from the files themselves.
EXPECTED = {
    "messages.jsonl": ({}, [_chat(_q(PEOPLE[0]), _a(PEOPLE[0]), system=SYS),
                            _chat("Extract name and age: " + _q(PEOPLE[1]), _a(PEOPLE[1]), "And the city?",
                                  '{"city": "Oslo"}')]),
    "messages.json": ({}, [_chat(_q(p), _a(p)) for p in PEOPLE]),
    "sharegpt.jsonl": ({}, [_chat(_q(p), _a(p), system=SYS) for p in PEOPLE]),
    "alpaca.json": ({}, [_chat("Extract name and age as JSON.\n\n" + _q(PEOPLE[0]), _a(PEOPLE[0])),
                         _chat("What is 1 + 1?", "2", "What is 2 + 3?", "5", system="Answer with a number.")]),
    "prompt_completion.jsonl": ({}, [_chat(_q(p), _a(p)) for p in PEOPLE]),
    "qa.csv": ({"fields": {"prompt": "question", "response": "answer"}}, [_chat(_q(p), _a(p)) for p in PEOPLE]),
    "qa.tsv": ({"fields": {"prompt": "question", "response": "answer"}}, [_chat(_q(p), _a(p)) for p in PEOPLE]),
    "chat.parquet": ({"fields": {"messages": "conversation"}}, [_chat(_q(p), _a(p)) for p in PEOPLE]),
}
TEXTS = {
    "text.jsonl": [f"{p[0]} works as a {p[3]} in {p[2]}." for p in PEOPLE],
    "text.txt": ["Lisbon is the capital of Portugal.\nIt lies on the Tagus.", "Oslo is the capital of Norway."],
}


def _data(**options) -> DataConfig:
    return DataConfig(train=[DataSource(path="unused.jsonl")], **options)


def _runs(input_ids, labels):
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_chat_format_example_is_labelled_token_by_token(tiny_tokenizer, name):
    options, conversations = EXPECTED[name]
    loaded = load_source(DataSource(path=str(FORMATS / name), **options), tiny_tokenizer, _data(), use_cache=False)
    assert loaded.stats.rows == len(conversations) and loaded.stats.kept == len(conversations)
    for example, messages in zip(loaded.examples, conversations, strict=True):
        # The ids are exactly the chat template's rendering of the expected conversation ...
        assert tiny_tokenizer.decode(example.input_ids) == tiny_tokenizer.apply_chat_template(messages, tokenize=False)
        # ... and the supervised tokens are exactly each answer followed by the end-of-turn token, nothing else.
        answers = [m["content"] + "<|end|>" for m in messages if m["role"] == "assistant"]
        assert [tiny_tokenizer.decode(run) for run in _runs(example.input_ids, example.labels)] == answers
        end = tiny_tokenizer.convert_tokens_to_ids("<|end|>")
        assert [run[-1] for run in _runs(example.input_ids, example.labels)] == [end] * len(answers)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_text_example_trains_every_token_but_bos(tiny_tokenizer, name):
    loaded = load_source(DataSource(path=str(FORMATS / name)), tiny_tokenizer, _data(), use_cache=False)
    assert loaded.stats.format == "text"
    for example, text in zip(loaded.examples, TEXTS[name], strict=True):
        body = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert example.input_ids == [tiny_tokenizer.bos_token_id, *body, tiny_tokenizer.eos_token_id]
        assert example.labels == [IGNORE_INDEX, *body, tiny_tokenizer.eos_token_id]


def test_bom_crlf_and_blank_lines_are_accepted(tmp_path, tiny_tokenizer):
    row = json.dumps({"messages": _chat("hi", "yo")})
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f"{row}\r\n\r\n{row}\r\n".encode())
    loaded = load_source(DataSource(path=str(path)), tiny_tokenizer, _data(), use_cache=False)
    assert loaded.stats.kept == 2 and [e.where for e in loaded.examples] == [f"{path}:1", f"{path}:3"]


def test_format_override_and_task_prefix(tmp_path, tiny_tokenizer):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "plain", "prompt": "p", "completion": "c"}) + "\n")
    as_pc = load_source(DataSource(path=str(path), format="prompt_completion", task_prefix="task: "), tiny_tokenizer,
                        _data(), use_cache=False)
    assert tiny_tokenizer.decode(as_pc.examples[0].input_ids).startswith("<|bos|><|user|>\ntask: p<|end|>")
    as_text = load_source(DataSource(path=str(path), format="text"), tiny_tokenizer, _data(), use_cache=False)
    assert tiny_tokenizer.decode(as_text.examples[0].input_ids) == "<|bos|>plain<|end|>"


def test_no_chat_template_is_a_clear_error_and_config_template_fixes_it(tmp_path, tiny_tokenizer):
    from lorafit.data import use_configured_template

    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    source = DataSource(path=str(FORMATS / "prompt_completion.jsonl"))
    with pytest.raises(LorafitError, match="need a chat template.*\n.*\n.*data.chat_template"):
        load_source(source, bare, _data(), use_cache=False)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|end|>' }}{% endfor %}"
                        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    use_configured_template(bare, _data(chat_template_file=str(template)))
    loaded = load_source(source, bare, _data(), use_cache=False)
    assert bare.decode(loaded.examples[0].input_ids).startswith("user: Ana Lopez")
    # Text needs no template at all.
    assert load_source(DataSource(path=str(FORMATS / "text.jsonl")), copy.deepcopy(tiny_tokenizer), _data(),
                       use_cache=False).stats.kept == 3


# ---------------------------------------------------------------------------------------------- broken files
# One file per error class under tests/data/broken/; each message names the file and the line (or item/row).
BROKEN_CASES = {
    "malformed_json.jsonl": "malformed_json.jsonl:2: malformed JSON (Expecting ',' delimiter, column 49)",
    "not_an_object.jsonl": "not_an_object.jsonl:2: expected a JSON object, got list",
    "missing_field.jsonl": 'missing_field.jsonl:2: field "messages" missing (keys: conversation)',
    "empty_field.jsonl": "empty_field.jsonl:1: message 1 is an empty assistant turn",
    "unknown_role.jsonl": "unknown_role.jsonl:2: messages[1].role is 'robot'; expected one of system, user, assistant",
    "no_assistant.jsonl": "no_assistant.jsonl:1: no assistant turn: nothing to train on",
    "role_order.jsonl": "role_order.jsonl:1: message 3 is a second user turn in a row",
    "not_utf8.jsonl": "not_utf8.jsonl:2: not valid UTF-8 (byte offset 136 in the file)",
    "empty.jsonl": "empty.jsonl: no rows in the file",
    "unknown_format.jsonl": "unknown_format.jsonl:1: cannot tell the data format from the keys (question, answer)",
    "array_item.json": "array_item.json:14 (item 1): message 0 is an assistant turn before any user turn",
    "array_malformed.json": "array_malformed.json:8: malformed JSON (Expecting ':' delimiter, column 16) in item 1",
    "csv_row.csv": 'csv_row.csv:3 (row 2): field "completion" is empty',
    "sharegpt_role.jsonl": "sharegpt_role.jsonl:1: conversations[1].from is 'narrator'",
    "alpaca_missing.json": 'alpaca_missing.json:3 (item 1): field "output" missing',
    "content_part.jsonl": "content_part.jsonl:1: messages[0].content[0] is 'image_url'; only",
    "part_text_key.jsonl": 'part_text_key.jsonl:1: messages[0].content[0] is a text part without a string "text" key '
                           "(keys: type, value); set fields: {part_text: value} on this source",
    "preference.jsonl": 'preference.jsonl:1: this is preference data (the row has "chosen" and "rejected")',
    "fake.parquet": "fake.parquet: not a Parquet file (it holds JSON text; a Parquet file starts with the bytes PAR1)\n"
                    "  fix: rename it to .jsonl (one object per line) or .json (an array), or re-export it as Parquet",
}
runner = CliRunner()


@pytest.mark.parametrize("name", sorted(BROKEN_CASES))
def test_broken_file_names_file_and_line_through_the_cli(tmp_path, tiny_model_dir, name):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{path: {tiny_model_dir}}}\ndata: {{train: [{{path: {BROKEN / name}}}]}}\n")
    result = runner.invoke(app, ["data", "inspect", str(config), "--no-cache"])
    assert result.exit_code == 1, result.output
    assert BROKEN_CASES[name] in result.output, result.output
    assert "error: " in result.output and "Traceback" not in result.output and result.exception is None or \
        isinstance(result.exception, SystemExit)


def test_broken_folder_has_one_case_per_file():
    assert sorted(p.name for p in BROKEN.iterdir()) == sorted(BROKEN_CASES)


def test_unreadable_parquet_files_say_what_they_are_and_how_to_fix_them(tmp_path):
    """Issue 23 item 12: not the raw Arrow message ("Parquet magic bytes not found in footer", "Couldn't deserialize
    thrift"), but what the file is, told from its bytes, with a fix line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lorafit.data.readers import read_rows

    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": f"row {i} " * 20} for i in range(40)]), good)
    raw = good.read_bytes()
    files = {"empty": b"", "csv": b"prompt,completion\nHi,Hello\n", "cut": raw[: len(raw) // 2],
             "damaged": raw[:4] + bytes(len(raw) - 8) + raw[-4:]}
    expected = {
        "empty": ("the file is empty (0 bytes), not a Parquet file", "point the source at a file with data"),
        "csv": ("not a Parquet file (it holds text, starting 'prompt,completion'; a Parquet file starts with the bytes "
                "PAR1)", "extension of its real format (.jsonl, .json, .csv"),
        "cut": (f"a Parquet file cut short ({len(raw) // 2:,} bytes: it starts as Parquet but has no footer)",
                "copy or download the file again"),
        "damaged": ("a damaged Parquet file (its start and end markers are there", "copy or download the file again"),
    }
    for name, content in files.items():
        path = tmp_path / f"{name}.parquet"
        path.write_bytes(content)
        with pytest.raises(LorafitError) as info:
            read_rows(path)
        what, fix = expected[name]
        assert info.value.what.startswith(f"{path}: {what}"), info.value.what
        assert fix in info.value.fix
        message = info.value.render()
        for raw_words in ("magic bytes", "thrift", "Arrow", "Could not open"):
            assert raw_words not in message, message
    assert [row.value for row in read_rows(good)][:1] == [{"text": "row 0 " * 20}]


def test_on_error_skip_counts_by_reason_and_respects_max_skip_fraction(tmp_path, tiny_tokenizer):
    good = json.dumps({"messages": _chat("q", "a")})
    lines = [good] * 8 + ["{broken", json.dumps({"messages": _chat("q", "")})]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    loaded = load_source(DataSource(path=str(path), on_error="skip", max_skip_fraction=0.2), tiny_tokenizer, _data(),
                         use_cache=False)
    assert loaded.stats.kept == 8 and loaded.stats.skipped == {"malformed_json": 1, "empty_field": 1}
    assert [(r["where"], r["reason"]) for r in loaded.skipped_rows] == [(f"{path}:9", "malformed_json"),
                                                                          (f"{path}:10", "empty_field")]
    with pytest.raises(LorafitError, match=r"2 of 10 rows are invalid \(20.0%\), more than max_skip_fraction=0.1"):
        load_source(DataSource(path=str(path), on_error="skip", max_skip_fraction=0.1), tiny_tokenizer, _data(),
                    use_cache=False)
    with pytest.raises(LorafitError, match="2 invalid rows"):
        load_source(DataSource(path=str(path)), tiny_tokenizer, _data(), use_cache=False)


def test_data_inspect_reports_every_source_and_marks_trained_tokens(tiny_model_dir):
    config = REPO / "examples" / "formats.yaml"
    result = runner.invoke(app, ["data", "inspect", str(config), "--json", "--set", f"model.path={tiny_model_dir}"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [s["format"] for s in report["sources"]] == ["messages", "messages", "sharegpt", "alpaca",
                                                        "prompt_completion", "prompt_completion", "prompt_completion",
                                                        "messages"]
    assert report["audit"] == [] and report["train_examples"] == 22
    first = report["sources"][0]
    assert first["rows"] == 2 and first["kept"] == 2 and first["skipped"] == {}
    assert first["tokens"]["min"] <= first["tokens"]["median"] <= first["tokens"]["p95"] <= first["tokens"]["max"]
    assert 0 < first["supervised_fraction"] < 1 and first["padding_fraction"]["padding_free"] == 0.0
    marked = report["example"]["marked"]
    assert marked.count("[[") >= 1 and marked.endswith("<|end|>]]\n")
    text = runner.invoke(app, ["data", "inspect", str(config), "--set", f"model.path={tiny_model_dir}"])
    assert text.exit_code == 0 and "audit: passed" in text.output and "tokens per example: min" in text.output
    assert marked in text.output  # not a terminal: brackets, no colour codes


def test_text_parts_with_another_text_key_are_read_through_the_field_map(tiny_tokenizer):
    source = DataSource(path=str(BROKEN / "part_text_key.jsonl"), fields={"part_text": "value"})
    [example] = load_source(source, tiny_tokenizer, _data(), use_cache=False).examples
    expected = tiny_tokenizer.apply_chat_template(_chat("Ana Lopez, 34.", '{"name": "Ana Lopez"}'), tokenize=True)
    assert example.input_ids == expected["input_ids"]


def test_preference_rows_are_refused_even_with_on_error_skip(tmp_path, tiny_tokenizer):
    """A preference file read as ordinary rows would train the conversation without its answers (or the rejected
    one): the whole source is refused, pointing to preference training, whatever on_error says."""
    rows = [{"prompt": "Is Lisbon in Spain?", "chosen": "No, in Portugal.", "rejected": "Yes."}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LorafitError) as info:
        load_source(DataSource(path=str(path), on_error="skip", max_skip_fraction=1.0), tiny_tokenizer, _data(),
                    use_cache=False)
    assert "preference data" in info.value.render() and "objective: {type: dpo}" in info.value.render()
    # Mapping the preferred answer on purpose trains on it as a prompt/completion pair.
    mapped = load_source(DataSource(path=str(path), fields={"completion": "chosen"}), tiny_tokenizer, _data(),
                         use_cache=False)
    assert mapped.stats.format == "prompt_completion" and mapped.stats.kept == 1
