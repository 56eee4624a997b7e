"""Read conversations from messages JSONL (``{"messages": [{"role", "content"}, ...]}``) and check each row.

Every problem names the file and line, says what was expected, and up to ``MAX_LISTED`` problems are reported
together, so a user fixes a file in one pass instead of one error per run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.errors import LorafitError

ROLES = ("system", "user", "assistant")
MAX_LISTED = 10


@dataclass(frozen=True)
class Conversation:
    """One training example: its messages and where it came from (for error messages and reports)."""

    messages: tuple[dict, ...]
    source: str
    line: int
    # The row's other fields (e.g. "source", "should_refuse", "sources"), for evaluation; training ignores them.
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def _check_messages(messages: object) -> str | None:
    """Return what is wrong with a ``messages`` value, or None. Pure, so each rule is easy to test."""
    if not isinstance(messages, list) or not messages:
        return 'field "messages" must be a non-empty list of {"role", "content"} objects'
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] must be an object with \"role\" and \"content\""
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"messages[{i}].content must be a string (got {type(content).__name__})"
        if role == "system" and i != 0:
            return f"messages[{i}] is a system message; only the first message may be one"
        if role == "assistant" and not content.strip():
            return f"messages[{i}] is an empty assistant turn: there is nothing to learn from it"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn: nothing to train on"
    return None


def read_messages_jsonl(path: Path) -> list[Conversation]:
    """Parse ``path``; raise one LorafitError listing the first problems (file:line: what) if any."""
    path = Path(path)
    if not path.is_file():
        raise LorafitError(f"{path}: data file not found", fix="check data.train / data.eval paths (relative to the config file)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 BOM is common in files saved by editors: accept it
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise LorafitError(
            f"{path}:{line}: not valid UTF-8 (byte offset {exc.start})", fix="re-save the file as UTF-8"
        ) from None
    conversations: list[Conversation] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):  # splitlines: CRLF is fine
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: malformed JSON ({exc.msg}, column {exc.colno})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            continue
        if "messages" not in row:
            problems.append(f'{path}:{number}: field "messages" missing (keys: {", ".join(row) or "none"})')
            continue
        problem = _check_messages(row["messages"])
        if problem:
            problems.append(f"{path}:{number}: {problem}")
            continue
        messages = tuple({"role": m["role"], "content": m["content"]} for m in row["messages"])
        meta = {key: value for key, value in row.items() if key != "messages"}
        conversations.append(Conversation(messages, str(path), number, meta))
    if problems:
        listed = problems[:MAX_LISTED]
        more = len(problems) - len(listed)
        raise LorafitError(
            f"{path}: {len(problems)} invalid row{'s' if len(problems) > 1 else ''}",
            details=listed + ([f"... and {more} more"] if more else []),
            why='each line must be an object like {"messages": [{"role": "user", "content": "..."}, '
            '{"role": "assistant", "content": "..."}]}',
            fix="fix or remove those lines; see docs/data.md",
        )
    if not conversations:
        raise LorafitError(f"{path}: no conversations in the file", why="the file is empty or only blank lines")
    return conversations
