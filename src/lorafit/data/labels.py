"""Chat-template rendering and response-only labels that are right for any template.

Most real chat templates have no ``{% generation %}`` markers, so we do not rely on them. Instead, for each
assistant turn ``i`` we render the conversation up to the turn with the generation prompt (what the model sees
at inference time) and up to the end of the turn; the text between the two is exactly what the model must
produce. Of that text we supervise the content and the template's end-of-turn token (the first special token
after the content), never the trailing newline some templates add after it.

Each piece is tokenised on its own and the ids are concatenated. That gives exact boundaries (no BPE merge
straddles prompt and answer) and the same prompt tokens the model gets when it generates.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafit.errors import LorafitError

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


@dataclass(frozen=True)
class Piece:
    text: str
    supervised: bool


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    # Supervised assistant turns with no end-of-turn token after them: the model would never learn to stop.
    unterminated_turns: int = 0

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def special_token_strings(tokenizer) -> list[str]:
    """Every special or added token's text, longest first (so '<|end|>' never hides '<|end|>x')."""
    tokens = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    return sorted((t for t in tokens if t), key=len, reverse=True)


def _end_of_answer(segment: str, content: str, specials: list[str]) -> int:
    """Index in ``segment`` where supervision stops: after the first special token that follows the content.

    >>> _end_of_answer('{"a": 1}<|end|>\\n', '{"a": 1}', ['<|end|>'])
    15
    >>> _end_of_answer('Hi.</s>', 'Hi.', ['</s>'])
    7
    >>> _end_of_answer(' Hi.\\n\\n', 'Hi.', [])   # no end-of-turn token: the answer, without trailing space
    4
    """
    found = segment.find(content) if content else -1
    after = found + len(content) if found >= 0 else 0
    best: tuple[int, int] | None = None
    for token in specials:
        position = segment.find(token, after)
        if position >= 0 and (best is None or position < best[0]):
            best = (position, position + len(token))
    return best[1] if best else len(segment.rstrip())


def _ends_with_special(text: str, specials: list[str]) -> bool:
    return any(text.endswith(token) for token in specials)


def render(tokenizer, messages, *, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def split_supervised(tokenizer, messages, *, train_on: str = "all_assistant", where: str = "") -> list[Piece]:
    """Split the rendered conversation into pieces, marking the ones the loss is computed on.

    ``train_on``: "all_assistant" (every assistant turn), "last_assistant" (only the final one, earlier answers
    are context) or "all" (every token).

    Raises LorafitError if the template renders a conversation differently when it is extended (the prompt of
    turn i is then not a prefix of the whole), because labels would not match what the model sees.
    """
    full = render(tokenizer, messages, add_generation_prompt=False)
    if train_on == "all":
        return [Piece(full, True)]
    specials = special_token_strings(tokenizer)
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = assistant_turns[-1:] if train_on == "last_assistant" else assistant_turns
    pieces: list[Piece] = []
    cursor = 0
    for i in trained:
        message = messages[i]
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(prompt) and full.startswith(upto) and len(prompt) >= cursor):
            raise LorafitError(
                f"{where}: the chat template renders turn {i} differently once the conversation goes on",
                why="response-only labels need the prompt of each assistant turn to be a prefix of the whole "
                "conversation, as it is at inference time",
                fix="use a template without history-dependent rendering, or set data.train_on: all",
            )
        end = len(prompt) + _end_of_answer(upto[len(prompt):], message["content"], specials)
        pieces.append(Piece(full[cursor : len(prompt)], False))
        pieces.append(Piece(full[len(prompt) : end], True))
        cursor = end
    pieces.append(Piece(full[cursor:], False))
    return [p for p in pieces if p.text]


def tokenize_conversation(tokenizer, messages, *, train_on: str = "all_assistant", where: str = "") -> TokenizedExample:
    """Token ids and labels (IGNORE_INDEX where not supervised) for one conversation.

    The template supplies BOS and the like as text, so no special tokens are added here.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    specials = special_token_strings(tokenizer)
    unterminated = 0
    for piece in split_supervised(tokenizer, messages, train_on=train_on, where=where):
        ids = tokenizer(piece.text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if piece.supervised else [IGNORE_INDEX] * len(ids))
        if piece.supervised and train_on != "all" and not _ends_with_special(piece.text, specials):
            unterminated += 1
    return TokenizedExample(input_ids, labels, unterminated)


def tokenize_text(tokenizer, text: str) -> TokenizedExample:
    """Plain text for continued pre-training: BOS (if the tokenizer has one) + text + EOS, every token trained.

    EOS closes each document so the model learns where documents end; BOS is never a target (nothing precedes it).
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    input_ids = bos + ids + eos
    return TokenizedExample(input_ids, [IGNORE_INDEX] * len(bos) + ids + eos)
