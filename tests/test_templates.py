"""Response-only labels on five real template families, each with a tokenizer of its real kind (fixtures_tokenizers).

Checked token by token: which tokens are supervised (computed here independently, from where each answer and its
end-of-turn token sit in the rendered text), that the ids are the whole text's tokenisation, and that each turn's
generation prompt tokenises to exactly the tokens before its answer.
"""

from __future__ import annotations

import json

import pytest
from conftest import conversation, write_jsonl
from fixtures_tokenizers import (CHATML, CHATML_FILE, FAMILIES, LLAMA2, LLAMA2_RAW_FILE, MISTRAL_RAW_FILE, family,
                                 with_template)

from lorafit.config import DataConfig, DataSource
from lorafit.data import load_source, prepare_data
from lorafit.data.audit import audit_problems
from lorafit.data.formats import RowError
from lorafit.data.labels import IGNORE_INDEX, tokenize_conversation
from lorafit.data.templates import render
from lorafit.errors import LorafitError

SYSTEM = {"role": "system", "content": "You extract fields."}
TURNS = [
    {"role": "user", "content": "Ana Lopez is 34."},
    {"role": "assistant", "content": '{"name": "Ana Lopez", "age": 34}'},
    {"role": "user", "content": "And her city?"},
    {"role": "assistant", "content": "Lisbon."},
]
NO_SYSTEM_ROLE = ("mistral", "gemma")


def _messages(name: str) -> list[dict]:
    return TURNS if name in NO_SYSTEM_ROLE else [SYSTEM, *TURNS]


def _answer_regions(full: str, messages: list[dict], end_of_turn: str) -> list[tuple[int, int]]:
    """Where each answer and the end-of-turn token right after it are, found by plain string search."""
    regions, cursor = [], 0
    for message in messages:
        if message["role"] == "assistant":
            start = full.index(message["content"], cursor)
            end = full.index(end_of_turn, start + len(message["content"])) + len(end_of_turn)
            regions.append((start, end))
            cursor = end
    return regions


@pytest.mark.parametrize("name", list(FAMILIES))
def test_labels_token_by_token_on_each_family(name):
    tokenizer, end_of_turn = family(name)
    messages = _messages(name)
    example = tokenize_conversation(tokenizer, messages)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    # The ids are the whole rendered conversation tokenised once: what apply_chat_template(tokenize=True) gives.
    assert example.input_ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    regions = _answer_regions(full, messages, end_of_turn)
    for k, ((start, end), label) in enumerate(zip(offsets, example.labels)):
        inside = any(start < r_end and end > r_start for r_start, r_end in regions)
        token = tokenizer.convert_ids_to_tokens(example.input_ids[k])
        assert (label != IGNORE_INDEX) == inside, f"token {k} {token!r} at {full[start:end]!r}"
        assert label in (IGNORE_INDEX, example.input_ids[k])
    # Each supervised run is one answer and its end-of-turn token (a leading `▁` may carry the space before it).
    runs, current = [], []
    for (start, end), label in zip(offsets, example.labels):
        if label != IGNORE_INDEX:
            current.append((start, end))
        elif current:
            runs.append(full[current[0][0] : current[-1][1]])
            current = []
    assert [run.lstrip() for run in runs + ([full[current[0][0]:current[-1][1]]] if current else [])] == [
        m["content"] + end_of_turn for m in messages if m["role"] == "assistant"]
    # What the model sees at inference: each generation prompt is exactly the tokens before its answer.
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt_ids = tokenizer(render(tokenizer, messages[:i], add_generation_prompt=True),
                                   add_special_tokens=False)["input_ids"]
            assert example.input_ids[: len(prompt_ids)] == prompt_ids
            assert example.labels[len(prompt_ids)] != IGNORE_INDEX and example.labels[len(prompt_ids) - 1] == IGNORE_INDEX
    assert (example.unterminated_turns, example.prompt_mismatch_turns, example.prompt_whitespace_turns) == (0, 0, 0)


def test_mistral_labels_pinned_token_by_token():
    """The Metaspace case of issue 11 item 10: answers follow `[/INST]` with no space, so the whole text has
    `Lisbon` where tokenising the answer alone gives `▁Lisbon` (a stray `▁` the model would learn to emit)."""
    tokenizer, _ = family("mistral")
    example = tokenize_conversation(tokenizer, TURNS)
    marked = [("+" if label != IGNORE_INDEX else "") + token
              for token, label in zip(tokenizer.convert_ids_to_tokens(example.input_ids), example.labels)]
    assert marked == ["<s>", "[INST]", "▁Ana", "▁Lopez", "▁is", "▁34", ".", "▁", "[/INST]",
                      '+{"', "+nam", '+e":', '+▁"Ana', '+▁Lopez",', '+▁"age":', "+▁34}", "+</s>",
                      "[INST]", "▁And", "▁her", "▁city?", "▁", "[/INST]", "+Lisbon", "+.", "+</s>"]
    alone = tokenizer("Lisbon.</s>", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(alone)[0] == "▁Lisbon."  # why pieces must not be tokenised separately


def test_phi3_eos_after_the_last_turn_is_not_a_history_change():
    """Phi-3 ends a conversation with eos_token after the last `<|end|>`; only the part through each answer's
    end-of-turn token has to be a prefix of the whole conversation, so multi-turn rows are fine (not refused)."""
    tokenizer, _ = family("phi3")
    example = tokenize_conversation(tokenizer, _messages("phi3"))
    assert tokenizer.convert_ids_to_tokens(example.input_ids[-1]) == "<|endoftext|>"
    assert example.labels[-1] == IGNORE_INDEX


def _data(**options) -> DataConfig:
    return DataConfig(train=[DataSource(path="unused.jsonl")], **options)


def test_gemma_refuses_a_system_turn_with_the_row_and_the_templates_message(tmp_path):
    tokenizer, _ = family("gemma")
    path = write_jsonl(tmp_path / "chat.jsonl", [conversation("Hi", "Hello."), conversation("Hi", "Hello.", system="Be brief.")])
    with pytest.raises(LorafitError) as info:
        load_source(DataSource(path=str(path)), tokenizer, _data(), use_cache=False)
    message = info.value.render()
    assert f"{path}:2: the chat template failed on this row: System role not supported" in message
    assert "data.system_turn: merge_into_first_user" in message and "Traceback" not in message


@pytest.mark.parametrize("policy, first_user", [("merge_into_first_user", "Be brief.\n\nHi"), ("drop", "Hi")])
def test_system_turn_policy_for_templates_without_a_system_role(tmp_path, policy, first_user):
    tokenizer, _ = family("gemma")
    path = write_jsonl(tmp_path / "chat.jsonl", [conversation("Hi", "Hello.", system="Be brief.")])
    loaded = load_source(DataSource(path=str(path)), tokenizer, _data(system_turn=policy), use_cache=False)
    [example] = loaded.examples
    expected = [{"role": "user", "content": first_user}, {"role": "assistant", "content": "Hello."}]
    assert example.input_ids == tokenizer.apply_chat_template(expected, tokenize=True)["input_ids"]
    assert tokenizer.decode([t for t, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX]) == "Hello.<end_of_turn>"


def test_system_turn_is_part_of_the_cache_key(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [conversation("Hi", "Hello.", system="Be brief.")])
    kept = load_source(DataSource(path=str(path)), tiny_tokenizer, _data(), use_cache=True).examples[0]
    dropped = load_source(DataSource(path=str(path)), tiny_tokenizer, _data(system_turn="drop"), use_cache=True).examples[0]
    assert "Be brief." in tiny_tokenizer.decode(kept.input_ids)
    assert "Be brief." not in tiny_tokenizer.decode(dropped.input_ids)


def test_template_using_a_missing_bos_token_names_the_row(tmp_path):
    tokenizer, _ = family("llama3")
    tokenizer.bos_token = None
    path = write_jsonl(tmp_path / "chat.jsonl", [conversation("Hi", "Hello.")])
    with pytest.raises(LorafitError) as info:
        load_source(DataSource(path=str(path)), tokenizer, _data(), use_cache=False)
    message = info.value.render()
    assert f"{path}:1: the chat template failed on this row: 'bos_token' is undefined" in message
    assert "Traceback" not in message and "on_error: skip" in message


def test_indented_template_file_is_labelled_and_its_whitespace_named(tmp_path):
    """A .jinja file laid out with indentation and newlines puts a newline after the generation prompt that the
    conversation does not have there. Labels are still right; a warning names the real cause."""
    tokenizer = with_template("chatml", CHATML_FILE)
    messages = [SYSTEM, *TURNS]
    example = tokenize_conversation(tokenizer, messages)
    supervised = [t for t, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == '{"name": "Ana Lopez", "age": 34}<|im_end|>Lisbon.<|im_end|>'
    assert example.input_ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert example.prompt_whitespace_turns == 2

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    data = DataConfig(train=[DataSource(path=str(path))])
    prepared = prepare_data(data, tokenizer, seed=0, batch_size=1, group_by_length=False, use_cache=False)
    assert prepared.audit == []
    [warning] = prepared.warnings
    assert "differs from the conversation in whitespace only" in warning and "template file" in warning


@pytest.mark.parametrize("name, template", [("mistral", MISTRAL_RAW_FILE), ("phi3", LLAMA2_RAW_FILE)])
def test_raw_indented_template_supervises_from_the_answers_first_character(tmp_path, name, template):
    """Issue 23 item 2: raw `mistral-instruct.jinja` / `llama-2-chat.jinja`-style files (indented, no generation-prompt
    block) put `\\n` + 8 spaces before every answer. Those layout tokens are not trained; labels start at the token that
    holds the answer's first character and run through the end-of-turn token; a whitespace warning, audit passed.
    SentencePiece-style tokenizers: Metaspace (mistral) and Llama-2's Prepend/Replace normaliser (phi3 family)."""
    tokenizer = with_template(name, template)
    eos = tokenizer.eos_token
    messages = [SYSTEM, *TURNS]
    example = tokenize_conversation(tokenizer, messages)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == tokenizer(full, add_special_tokens=False)["input_ids"]
    offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    regions = []
    for answer in answers:
        start = full.index(answer)
        assert full[:start].endswith("[/INST]\n         ")  # the layout this test is about
        regions.append((start, full.index(eos, start) + len(eos)))
    for k, ((start, end), label) in enumerate(zip(offsets, example.labels)):
        inside = any(start < r_end and end > r_start for r_start, r_end in regions)
        token = tokenizer.convert_ids_to_tokens(example.input_ids[k])
        assert (label != IGNORE_INDEX) == inside, f"token {k} {token!r} at {full[start:end]!r}"
    supervised = [tokenizer.convert_ids_to_tokens(t) for t, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX]
    assert "▁" not in supervised[:1] and supervised.count(eos) == 2  # no layout token leads the labels
    assert (example.unterminated_turns, example.prompt_mismatch_turns, example.prompt_whitespace_turns) == (0, 0, 2)

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    prepared = prepare_data(DataConfig(train=[DataSource(path=str(path))]), tokenizer, seed=0, batch_size=1,
                            group_by_length=False, use_cache=False)
    assert prepared.audit == []
    [warning] = prepared.warnings
    assert "2 assistant turn(s)" in warning and "whitespace only" in warning and "indentation before each answer" in warning


def test_raw_mistral_file_labels_pinned_token_by_token():
    tokenizer = with_template("mistral", MISTRAL_RAW_FILE)
    example = tokenize_conversation(tokenizer, TURNS)
    marked = [("+" if label != IGNORE_INDEX else "") + token
              for token, label in zip(tokenizer.convert_ids_to_tokens(example.input_ids), example.labels)]
    layout = ["\n"] + ["▁"] * 8
    assert marked == ["▁", "\n", "<s>", "\n", *["▁"] * 8, "[INST]", "▁Ana", "▁Lopez", "▁is", "▁34", ".", "▁", "[/INST]",
                      *layout, '+▁{"name":', '+▁"Ana', '+▁Lopez",', '+▁"age":', "+▁34}", "+▁", "+</s>",
                      *layout, "[INST]", "▁And", "▁her", "▁city?", "▁", "[/INST]", *layout, "+▁Lisbon.", "+▁", "+</s>", "\n"]


def test_one_line_llama2_template_is_exact_and_unwarned():
    """Llama-2-chat's shipped one-line template: the single space before the answer is absorbed by its first token
    (`▁Lisbon.`), which is trained as before; no whitespace warning."""
    tokenizer = with_template("phi3", LLAMA2)
    example = tokenize_conversation(tokenizer, TURNS)
    supervised = [tokenizer.convert_ids_to_tokens(t) for t, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX]
    assert supervised[0] == '▁{"name":' and supervised[-3:] == ["▁Lisbon.", "▁", "<|endoftext|>"]
    assert (example.prompt_mismatch_turns, example.prompt_whitespace_turns) == (0, 0)


def test_an_answers_own_leading_whitespace_is_still_trained():
    """Only template layout is skipped: indentation that is part of the answer (code) is trained as before."""
    tokenizer = with_template("chatml", CHATML)
    example = tokenize_conversation(tokenizer, [{"role": "user", "content": "Code?"},
                                                {"role": "assistant", "content": "    return 1"}])
    supervised = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "    return 1<|im_end|>"
    assert (example.prompt_mismatch_turns, example.prompt_whitespace_turns) == (0, 0)


def test_a_template_that_rewrites_earlier_turns_is_still_refused():
    """Earlier answers rendered differently once the conversation goes on (as templates that cut reasoning from
    past turns do): the labels of turn 1 would not match the whole conversation."""
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
                "{% if m['role'] == 'assistant' and not loop.last %}{{ '...' }}{% else %}{{ m['content'] }}{% endif %}"
                "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(RowError) as info:
        tokenize_conversation(with_template("chatml", template), TURNS)
    assert info.value.reason == "template_history" and "earlier turns change once later ones follow" in info.value.message


def test_a_token_straddling_the_generation_prompt_fails_the_audit(tmp_path):
    """`Assistant: ` ends with a space that each answer's first token absorbs (`Ġ{"`, `ĠLisbon`): at inference the prompt
    ends with a lone space token the model never saw before an answer. Counted, and the audit stops on it."""
    template = ("{% for m in messages %}{{ m['role'].capitalize() + ': ' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")
    tokenizer = with_template("chatml", template)
    example = tokenize_conversation(tokenizer, TURNS)
    assert example.prompt_mismatch_turns == 2
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TURNS}])
    loaded = load_source(DataSource(path=str(path)), tokenizer, _data(), use_cache=False)
    [problem] = audit_problems([loaded.stats], train_on="all_assistant", max_seq_length=512, split="train")
    assert "straddles the end of the generation prompt" in problem


def test_plain_chatml_is_unchanged_by_whole_text_tokenisation():
    """On a byte-level BPE no merge crosses `\\n` or a special token, so the whole-text ids equal the old
    piece-by-piece ids: existing runs and caches of such data tokenise to the same thing."""
    tokenizer = with_template("chatml", CHATML)
    example = tokenize_conversation(tokenizer, [SYSTEM, *TURNS])
    pieces = ["<|im_start|>system\nYou extract fields.<|im_end|>\n<|im_start|>user\nAna Lopez is 34.<|im_end|>\n"
              "<|im_start|>assistant\n", '{"name": "Ana Lopez", "age": 34}<|im_end|>',
              "\n<|im_start|>user\nAnd her city?<|im_end|>\n<|im_start|>assistant\n", "Lisbon.<|im_end|>", "\n"]
    assert example.input_ids == [t for p in pieces for t in tokenizer(p, add_special_tokens=False)["input_ids"]]


def test_eval_prompts_follow_system_turn_and_a_refusing_template_is_a_clear_error(tmp_path):
    """Generation (eval, generate, chat) renders prompts as training did: data.system_turn applies to eval examples,
    and a template that raises is a LorafitError with its own message, not a jinja2 traceback."""
    from lorafit.config import DataConfig
    from lorafit.errors import LorafitError
    from lorafit.evaluate.examples import run_examples
    from lorafit.evaluate.generate import render_prompt

    tokenizer, _ = family("gemma")
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]}]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    train = tmp_path / "train.jsonl"
    train.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(LorafitError, match="System role not supported"):
        render_prompt(tokenizer, rows[0]["messages"][:2])
    data = DataConfig(train=[{"path": str(train)}], eval=[{"path": str(path)}], system_turn="merge_into_first_user")
    (example,) = run_examples(data, [])
    assert [m["role"] for m in example.prompt] == ["user"]
    assert example.prompt[0]["content"].startswith("Be brief.") and example.prompt[0]["content"].endswith("Hi")
    assert "Be brief." in render_prompt(tokenizer, example.prompt)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_generation_stops_at_the_token_training_ends_answers_with(name):
    """One notion of end-of-turn: the token labels supervise at the end of an answer is a stop id of generation."""
    from lorafit.data.labels import end_of_turn_token, special_token_strings
    from lorafit.evaluate.generate import stop_token_ids

    tokenizer, _ = family(name)
    end_of_turn = end_of_turn_token(tokenizer, special_token_strings(tokenizer))
    assert end_of_turn is not None
    assert tokenizer.convert_tokens_to_ids(end_of_turn) in stop_token_ids(tokenizer)
