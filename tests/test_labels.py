"""Response-only labels, token by token, for three chat template styles without generation markers."""

from __future__ import annotations

import copy

import pytest
import torch

from lorafit.data.collate import PadCollator
from lorafit.data.labels import IGNORE_INDEX, tokenize_conversation

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

MULTI_TURN = [
    {"role": "system", "content": "You extract fields. Answer in JSON."},
    {"role": "user", "content": "Ana Lopez is 34 and lives in Lisbon."},
    {"role": "assistant", "content": '{"name": "Ana Lopez", "age": 34}'},
    {"role": "user", "content": "And her city?"},
    {"role": "assistant", "content": '{"city": "Lisbon"}'},
    {"role": "user", "content": "Thanks."},
    {"role": "assistant", "content": "You are welcome."},
]


def _styled_tokenizer(base, template: str, specials: list[str]):
    tokenizer = copy.deepcopy(base)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = template
    return tokenizer


def _tokenizers(base):
    return {
        "lorafit": (base, "<|end|>"),
        "chatml": (_styled_tokenizer(base, CHATML, ["<|im_start|>", "<|im_end|>"]), "<|im_end|>"),
        "llama3": (
            _styled_tokenizer(base, LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
            "<|eot_id|>",
        ),
    }


def _supervised_runs(example) -> list[list[int]]:
    """Contiguous runs of supervised positions, as the token ids at those positions."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token, "a supervised label must be the input token itself (shift happens in the model)"
            current.append(token)
    if current:
        runs.append(current)
    return runs


@pytest.mark.parametrize("style", ["lorafit", "chatml", "llama3"])
def test_supervised_tokens_are_exactly_assistant_contents_plus_end_of_turn(tiny_tokenizer, style):
    tokenizer, end_of_turn = _tokenizers(tiny_tokenizer)[style]
    example = tokenize_conversation(tokenizer, MULTI_TURN)
    runs = _supervised_runs(example)
    expected = [m["content"] + end_of_turn for m in MULTI_TURN if m["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in runs] == expected
    # The end-of-turn token is a single supervised token ending each run.
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    assert [run[-1] for run in runs] == [eot_id] * 3
    # Nothing else is supervised: the count matches the three answers tokenised on their own plus EOT each.
    answer_tokens = sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) + 1
                        for m in MULTI_TURN if m["role"] == "assistant")
    assert example.num_supervised == answer_tokens
    # And the ids are the rendered conversation: decoding them all gives the template's own text back.
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)


def test_train_on_all_supervises_every_token(tiny_tokenizer):
    example = tokenize_conversation(tiny_tokenizer, MULTI_TURN, train_on="all")
    assert example.labels == example.input_ids


def test_train_on_last_assistant_supervises_only_the_final_answer(tiny_tokenizer):
    example = tokenize_conversation(tiny_tokenizer, MULTI_TURN, train_on="last_assistant")
    assert [tiny_tokenizer.decode(run) for run in _supervised_runs(example)] == ["You are welcome.<|end|>"]
    assert example.input_ids == tokenize_conversation(tiny_tokenizer, MULTI_TURN).input_ids


def test_a_template_without_end_of_turn_token_is_counted(tiny_tokenizer):
    """A template that closes answers with plain text only: the audit needs to know no stop token is trained."""
    plain = _styled_tokenizer(tiny_tokenizer, "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
                              "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}", [])
    assert tokenize_conversation(plain, MULTI_TURN).unterminated_turns == 3
    assert tokenize_conversation(tiny_tokenizer, MULTI_TURN).unterminated_turns == 0


def test_pad_equal_to_eos_still_trains_eos(tiny_tokenizer):
    """Masking is by position: an EOS label survives collation even when pad id == EOS id."""
    example = tokenize_conversation(tiny_tokenizer, MULTI_TURN[:3])
    short = tokenize_conversation(tiny_tokenizer, [MULTI_TURN[1], {"role": "assistant", "content": "ok"}])
    eos = tiny_tokenizer.eos_token_id
    batch = PadCollator(pad_token_id=eos)(
        [{"input_ids": e.input_ids, "labels": e.labels} for e in (example, short)]
    )
    n = len(short.input_ids)
    assert batch["labels"][1, n - 2].item() == eos  # the real EOS of the short answer (before the trailing "\n")
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all()  # padding, though its id is EOS too
    assert (batch["attention_mask"][1, n:] == 0).all() and (batch["attention_mask"][1, :n] == 1).all()
    assert batch["input_ids"].dtype == torch.long
