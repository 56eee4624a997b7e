"""Rendering conversations with a chat template, and the row errors a template can cause.

A template is user code: it may raise (Gemma's ``raise_exception('System role not supported')``), use a special
token the tokenizer does not define (``bos_token + ...``), or silently drop what it does not know (tool calls
on a template without tool support). Each of these becomes a ``RowError`` naming the template's own message, so
the source's ``on_error`` policy applies and the user sees ``file:line: ...`` instead of a jinja2 traceback.
"""

from __future__ import annotations

from pathlib import Path

from lorafit.data.formats import RowError
from lorafit.errors import LorafitError

SYSTEM_TURN_POLICIES = ("keep", "merge_into_first_user", "drop")


def render(tokenizer, messages, *, add_generation_prompt: bool, tools=None) -> str:
    """The template's text for ``messages``; RowError (reason ``template_error``) when the template raises."""
    import jinja2

    messages = list(messages)
    kwargs = {"tools": list(tools)} if tools else {}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    except jinja2.exceptions.UndefinedError as error:
        raise RowError("template_error", f"the chat template failed on this row: {error} (the template uses a "
                       "variable this tokenizer does not define, e.g. a special token such as bos_token it has none of; "
                       "fix: give the tokenizer that token, or use a template without it)") from None
    except (jinja2.exceptions.TemplateError, TypeError) as error:
        raise RowError("template_error", f"the chat template failed on this row: {error}{_hint(messages, error)}") from None


def _hint(messages: list[dict], error: Exception) -> str:
    if messages and messages[0]["role"] == "system" and "system" in str(error).lower():
        return (" (this template has no system role; fix: set data.system_turn: merge_into_first_user to put the "
                "system text before the first user message, or data.system_turn: drop)")
    return ""


def apply_system_turn(messages: tuple[dict, ...], policy: str) -> tuple[dict, ...]:
    """The conversation as ``data.system_turn`` asks, for templates without a system role.

    >>> apply_system_turn(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}),
    ...                   "merge_into_first_user")
    ({'role': 'user', 'content': 'Be brief.\\n\\nHi'},)
    """
    if policy == "keep" or not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0], list(messages[1:])
    if policy == "merge_into_first_user":
        first = next(i for i, m in enumerate(rest) if m["role"] == "user")  # check_messages guarantees one
        rest[first] = {**rest[first], "content": system["content"] + "\n\n" + rest[first]["content"]}
    return tuple(rest)


def has_tool_parts(messages, tools) -> bool:
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def check_tools_rendered(rendered: str, messages, tools) -> None:
    """RowError when the template dropped a tool call, a tool result or the tool list: most templates without tool
    support render only ``content`` and would train the model on a conversation with the calls cut out."""
    missing = []
    for tool in tools or ():
        name = (tool.get("function") or tool).get("name") if isinstance(tool, dict) else None
        if name and name not in rendered:
            missing.append(f"the tool definition {name!r}")
    for message in messages:
        for call in message.get("tool_calls") or ():
            name = (call.get("function") or call).get("name")
            if name and name not in rendered:
                missing.append(f"the call to {name!r}")
        if message["role"] == "tool" and message["content"].strip() not in rendered:
            missing.append("a tool result")
    if missing:
        raise RowError("tools_unsupported", f"the chat template does not render tool use ({missing[0]} is missing from "
                       "the rendered text); fix: use a template with tool support (data.chat_template_file), or leave "
                       "such rows out with on_error: skip and max_skip_fraction on this source")



REASONING = "reasoning_content"  # the message field reasoning templates (Qwen3, DeepSeek-R1 and the like) read


def has_reasoning(messages) -> bool:
    return any(m.get(REASONING) for m in messages)


def check_reasoning_field(tokenizer, messages) -> None:
    """RowError when a row has reasoning and the chat template has no reasoning field: it would render the answers
    with the reasoning silently cut out."""
    template = tokenizer.chat_template
    text = template if isinstance(template, str) else repr(template)  # a dict of named templates: any of them
    if REASONING not in text:
        turn = next(i for i, m in enumerate(messages) if m.get(REASONING))
        raise RowError("reasoning_unsupported", f"message {turn} has a reasoning part and the chat template has no "
                       f"reasoning field (it never reads `{REASONING}`): the reasoning would be cut out of training; "
                       "fix: use a template that renders reasoning_content (data.chat_template_file, e.g. Qwen3's), "
                       "move the reasoning into the text parts, or leave such rows out with on_error: skip")


def check_reasoning_rendered(segment: str, message: dict, turn: int) -> None:
    """RowError when a supervised assistant turn's reasoning is not in the text trained for it (``segment``)."""
    reasoning = (message.get(REASONING) or "").strip()
    if reasoning and reasoning not in segment:
        raise RowError("reasoning_unsupported", f"the chat template does not render the reasoning of assistant turn "
                       f"{turn} (it reads `{REASONING}` but left it out here, as templates do for turns before the last "
                       "user message): it would be cut out of training; fix: set data.train_on: last_assistant so only "
                       "the final answer (with its reasoning) is trained, or use a template that renders it")


def use_configured_template(tokenizer, data) -> None:
    """Put the config's chat template (inline or file) on the tokenizer; it is saved with the adapter, so
    generation later renders prompts exactly as training did."""
    if data.chat_template_file:
        path = Path(data.chat_template_file)
        if not path.is_file():
            raise LorafitError(f"data.chat_template_file: {path} not found", fix="check the path (relative to the config file)")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    elif data.chat_template:
        tokenizer.chat_template = data.chat_template
