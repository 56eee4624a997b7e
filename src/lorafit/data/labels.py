"""Chat-template rendering and response-only labels that are right for any template and any tokenizer.

Most real chat templates have no ``{% generation %}`` markers, so we do not rely on them. Instead, for each
assistant turn ``i`` we render the conversation up to the turn with the generation prompt (what the model sees
at inference time) and up to the end of the turn; the characters between the two are what the model must
produce. Of those we supervise the answer and the template's end-of-turn token, never the trailing newline some
templates add after it.

The whole rendered conversation is then tokenised ONCE, with character offsets, and a token is supervised when
its characters overlap an answer span. So the ids are exactly the whole-text tokenisation (what
``apply_chat_template(tokenize=True)`` gives), for every tokenizer family: tokenising pieces separately adds a
stray ``▁`` on SentencePiece (Metaspace) tokenizers and can split merges differently. The trade-off: the prompt
tokens are the whole text's, which equal the generation prompt's own tokens unless a token straddles the end of
the generation prompt; such turns are counted (``prompt_mismatch_turns``) and the audit stops on them.

Layout whitespace: a template file laid out with indentation and no generation-prompt block (the published raw
``mistral-instruct.jinja`` and ``llama-2-chat.jinja``) puts a newline and indentation between the prompt and the
answer. Supervision starts at the answer's first character (where the rendered content is), not at that
whitespace; the turn is counted with the other whitespace-only differences (``prompt_whitespace_turns``, a warning).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafit.data.formats import RowError
from lorafit.data.templates import (check_reasoning_field, check_reasoning_rendered, check_tools_rendered, has_reasoning,
                                    has_tool_parts, render)
from lorafit.errors import LorafitError

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
_END_OF_TURN: dict[tuple, str | None] = {}
_PROBE = ({"role": "user", "content": "lorafit-probe-question"}, {"role": "assistant", "content": "lorafit-probe-answer"})


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    # Supervised assistant turns with no end-of-turn token after them: the model would never learn to stop.
    unterminated_turns: int = 0
    # Turns whose generation prompt tokenises differently from the tokens training puts before the answer.
    prompt_mismatch_turns: int = 0
    # Turns whose generation prompt differs from the conversation only in whitespace (indented template files).
    prompt_whitespace_turns: int = 0

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class Span:
    """Characters ``[start, end)`` of the rendered conversation that are supervised, and how the turn's
    generation prompt relates to them."""

    start: int
    end: int
    prompt: str  # the generation prompt of this turn ("" when train_on is all)
    prompt_exact: bool = True  # False: it matches the conversation only up to whitespace
    layout: bool = False  # True: whitespace between the generation prompt and the answer was left unsupervised


def special_token_strings(tokenizer) -> list[str]:
    """Every special or added token's text, longest first (so '<|end|>' never hides '<|end|>x')."""
    tokens = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    return sorted((t for t in tokens if t), key=len, reverse=True)


def _first_special(text: str, after: int, specials: list[str]) -> tuple[int, int] | None:
    best: tuple[int, int] | None = None
    for token in specials:
        position = text.find(token, after)
        if position >= 0 and (best is None or position < best[0]):
            best = (position, position + len(token))
    return best


def end_of_turn_token(tokenizer, specials: list[str]) -> str | None:
    """The special token the template closes an assistant answer with, found by rendering a probe conversation.

    Tool-call turns have no content to search after, and some templates put other special tokens inside a turn
    (``<tool_call>``), so the end is the first occurrence of THIS token, not of any special token.
    """
    # What the probe renders to depends only on the template and the special tokens: computed once per pair.
    key = (tokenizer.chat_template, repr(tokenizer.special_tokens_map), tuple(specials))
    if key not in _END_OF_TURN:
        try:
            text = render(tokenizer, _PROBE, add_generation_prompt=False)
        except RowError:
            text = ""
        answer = text.find(_PROBE[1]["content"])
        found = _first_special(text, answer + len(_PROBE[1]["content"]), specials) if answer >= 0 else None
        _END_OF_TURN[key] = text[found[0] : found[1]] if found else None
    return _END_OF_TURN[key]


def _end_of_answer(segment: str, content: str, specials: list[str], end_of_turn: str | None = None) -> int:
    """Index in ``segment`` where supervision stops: after the end-of-turn token that follows the content.

    >>> _end_of_answer('{"a": 1}<|end|>\\n', '{"a": 1}', ['<|end|>'])
    15
    >>> _end_of_answer('<tool_call>f</tool_call><|im_end|>\\n', '', ['<tool_call>', '</tool_call>', '<|im_end|>'], '<|im_end|>')
    34
    >>> _end_of_answer(' Hi.\\n\\n', 'Hi.', [])   # no end-of-turn token: the answer, without trailing space
    4
    """
    after = 0  # no content to find (a tool-call turn): the end-of-turn token after the start
    for probe in (content, content.strip()):  # templates that `| trim` the content render the stripped text
        found = segment.find(probe) if probe else -1
        if found >= 0:
            after = found + len(probe)
            break
    if end_of_turn and (position := segment.find(end_of_turn, after)) >= 0:
        return position + len(end_of_turn)
    best = _first_special(segment, after, specials)
    return best[1] if best else len(segment.rstrip())


def _answer_start(prompt: str, upto: str) -> tuple[int, bool]:
    """Where the answer starts in ``upto`` (the conversation through this turn), and whether the generation
    prompt is an exact prefix. A prompt that differs only in whitespace (a template file with indentation and a
    newline after ``{{ ... }}`` lines) is matched character by character ignoring whitespace; any other difference
    means the template renders history differently once the conversation goes on (-1)."""
    if upto.startswith(prompt):
        return len(prompt), True
    i = 0
    for char in prompt:
        if char.isspace():
            continue
        while i < len(upto) and upto[i].isspace():
            i += 1
        if i >= len(upto) or upto[i] != char:
            return -1, False
        i += 1
    while i < len(upto) and upto[i].isspace():
        i += 1
    return i, False


def _past_layout(segment: str, content: str) -> int:
    """How many characters of layout whitespace come before the answer's content in ``segment`` (the text after the
    generation prompt), or 0: only whitespace may be skipped, and only up to where the content (or, for templates
    that strip it, the stripped content) is found.

    >>> _past_layout('\\n         Lisbon. </s>', 'Lisbon.')
    10
    >>> _past_layout('Answer: Lisbon.', 'Lisbon.')
    0
    >>> _past_layout('  indented<|end|>', '  indented')   # the answer's own leading spaces are the answer
    0
    """
    for probe in (content, content.strip()):
        found = segment.find(probe) if probe.strip() else -1
        if found >= 0:  # the first probe found decides: the content as written before its stripped form
            return found if found > 0 and segment[:found].isspace() else 0
    return 0


def _divergence(a: str, b: str) -> str:
    at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"generation prompt ...{a[max(0, at - 20) : at + 20]!r} vs conversation ...{b[max(0, at - 20) : at + 20]!r}"


def supervised_spans(tokenizer, messages, *, train_on: str = "all_assistant", tools=None) -> tuple[str, list[Span]]:
    """The rendered conversation and the character spans the loss is computed on.

    ``train_on``: "all_assistant" (every assistant turn), "last_assistant" (only the final one, earlier answers
    are context) or "all" (every character). Raises RowError when a turn's generation prompt is not, up to
    whitespace, where the conversation has it (labels would not match what the model sees).
    """
    full = render(tokenizer, messages, add_generation_prompt=False, tools=tools)
    if has_tool_parts(messages, tools):
        check_tools_rendered(full, messages, tools)
    reasoning = has_reasoning(messages)
    if reasoning:
        check_reasoning_field(tokenizer, messages)
    if train_on == "all":
        if reasoning:  # the final answer's reasoning at least (templates drop it from earlier turns)
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            check_reasoning_rendered(full, messages[last], last)
        return full, [Span(0, len(full), "")]
    specials = special_token_strings(tokenizer)
    end_of_turn = end_of_turn_token(tokenizer, specials)
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans: list[Span] = []
    for i in assistant_turns[-1:] if train_on == "last_assistant" else assistant_turns:
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        upto = render(tokenizer, messages[: i + 1], add_generation_prompt=False, tools=tools)
        start, exact = _answer_start(prompt, upto)
        layout = _past_layout(upto[start:], messages[i]["content"]) if start >= 0 else 0
        start += layout
        end = start + _end_of_answer(upto[start:], messages[i]["content"], specials, end_of_turn) if start >= 0 else -1
        if start < 0 or full[:end] != upto[:end] or (spans and start < spans[-1].end):
            detail = _divergence(prompt, upto) if start < 0 else "the earlier turns change once later ones follow"
            if reasoning and start >= 0:
                detail += ("; reasoning templates drop the reasoning of earlier turns: data.train_on: last_assistant "
                           "trains the final one")
            raise RowError("template_history", f"the chat template renders assistant turn {i} differently from the "
                           f"generation prompt for it ({detail}): response-only labels would not match what the model "
                           "sees at inference; fix: use a template without history-dependent rendering, or set "
                           "data.train_on: all")
        if reasoning:
            check_reasoning_rendered(upto[start:end], messages[i], i)
        spans.append(Span(start, end, prompt, exact, layout > 0))
    return full, spans


def _overlaps(token: tuple[int, int], span: Span) -> bool:
    start, end = token
    if start == end:  # a zero-width token (a prefix the pre-tokenizer added): where it stands decides
        return span.start <= start < span.end
    return start < span.end and end > span.start


def tokenize_conversation(tokenizer, messages, *, train_on: str = "all_assistant", tools=None) -> TokenizedExample:
    """Token ids (the whole rendered conversation tokenised once) and labels (IGNORE_INDEX where not supervised).

    The template supplies BOS and the like as text, so no special tokens are added here.
    """
    full, spans = supervised_spans(tokenizer, messages, train_on=train_on, tools=tools)
    if train_on == "all":  # every token: no offsets needed (a slow tokenizer can do this too)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        return TokenizedExample(ids, list(ids))
    try:
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a Python (slow) tokenizer has no character offsets
        raise LorafitError(f"{type(tokenizer).__name__} gives no character offsets, which response-only labels need",
                           fix="use the model's fast tokenizer (a tokenizer.json in the model folder), or set "
                           "data.train_on: all") from None
    input_ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    supervised = [False] * len(input_ids)
    specials = special_token_strings(tokenizer)
    unterminated = mismatched = whitespace = 0
    for span in spans:
        first = None
        for k, token in enumerate(offsets):
            if _overlaps(token, span):
                supervised[k] = True
                first = k if first is None else first
        if not any(full[span.start : span.end].endswith(token) for token in specials):
            unterminated += 1
        if not span.prompt_exact:
            whitespace += 1
        elif first is not None and tokenizer(span.prompt, add_special_tokens=False)["input_ids"] != input_ids[:first]:
            # Layout whitespace left out of the labels: the tokens before the answer are the prompt's and that
            # whitespace (a difference in whitespace only). Otherwise a token straddles the prompt's end.
            if span.layout:
                whitespace += 1
            else:
                mismatched += 1
    labels = [t if s else IGNORE_INDEX for t, s in zip(input_ids, supervised)]
    return TokenizedExample(input_ids, labels, unterminated, mismatched, whitespace)


def tokenize_text(tokenizer, text: str) -> TokenizedExample:
    """Plain text for continued pre-training: BOS (if the tokenizer has one) + text + EOS, every token trained.

    EOS closes each document so the model learns where documents end; BOS is never a target (nothing precedes it).
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    input_ids = bos + ids + eos
    return TokenizedExample(input_ids, [IGNORE_INDEX] * len(bos) + ids + eos)
