"""Tokenizers and chat templates of five real model families, built in code (no download), for label tests.

Each family pairs the template its models ship (abridged only where noted) with a tokenizer of the same KIND as
the real one, trained in a second on a small corpus:

  chatml   Qwen2.5's template (with its tool-calling branches)   byte-level BPE, GPT-2 pre-tokenizer
  llama3   Llama-3's template (`bos_token + ...`, `| trim`)       byte-level BPE, tiktoken-style split regex
  mistral  Mistral-Instruct v0.2 (`[INST]`, answer + `</s>`)      SentencePiece-style BPE, Metaspace (prepend first)
  gemma    Gemma's template (no system role: raise_exception)    SentencePiece-style BPE, spaces -> `▁`, no splitting
  phi3     Phi-3-mini's template (eos_token after the last turn)  Llama-2-style BPE, normaliser Prepend(`▁`) + Replace

The vocabularies are small and made here, but the properties labels depend on are the real ones: how spaces and
word starts become tokens, whether special tokens split the text, what the template adds around answers.
"""

from __future__ import annotations

import functools

CORPUS = [
    "You extract fields. Answer in JSON. Ana Lopez is 34 and lives in Lisbon. And her city? Thanks. "
    "You are welcome. Hello there, how are you? What is the weather in Paris today? It is sunny and 21 degrees.",
    '{"name": "Ana Lopez", "age": 34} {"city": "Lisbon"} {"location": "Paris"} get_weather temperature',
    "The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 21 34 100.\nNew lines\n\n too.",
]

CHATML_TOOLS = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# ChatML with a reasoning field, as reasoning models' templates have (Qwen3's, abridged and written here): an
# assistant turn after the last user message renders `reasoning_content` in a <think> block before its answer;
# earlier turns lose their reasoning (what the model sees of its past turns at inference).
CHATML_REASONING = """{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{%- for m in messages %}
    {%- if m.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if m.reasoning_content and loop.index0 > ns.last_user %}
            {{- '<think>\\n' + m.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- m.content + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

# Plain ChatML with no tool support: it renders `content` only.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The same ChatML as a published .jinja file is laid out: indented, one statement per line, no `-` trimming.
# transformers renders with trim_blocks and lstrip_blocks, so what remains is the newline after each `{{ }}` line.
CHATML_FILE = """{% for message in messages %}
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|im_start|>assistant\\n' }}
{% endif %}
"""

# Raw template files in the layout of the published `mistral-instruct.jinja` and `llama-2-chat.jinja` (written here,
# not copied): indented, one statement per line, no `-` trimming and no `add_generation_prompt` block, so the
# generation prompt ends after `[/INST]` and its newline while the conversation goes on with the answer line's
# indentation and the `' '` before the answer. Rendered, every answer follows `\n` + 8 spaces + ' '.
MISTRAL_RAW_FILE = """{% if messages[0]['role'] == 'system' %}
    {% set turns = messages[1:] %}
    {% set preamble = messages[0]['content'].strip() + '\\n\\n' %}
{% else %}
    {% set turns = messages %}
    {% set preamble = '' %}
{% endif %}

{{ bos_token }}
{% for message in turns %}
    {% set text = (preamble if loop.first else '') + message['content'] %}
    {% if message['role'] == 'user' %}
        {{ '[INST] ' + text.strip() + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
        {{ ' ' + text.strip() + ' ' + eos_token }}
    {% endif %}
{% endfor %}
"""

LLAMA2_RAW_FILE = """{% if messages[0]['role'] == 'system' %}
    {% set turns = messages[1:] %}
    {% set preamble = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}
{% else %}
    {% set turns = messages %}
    {% set preamble = '' %}
{% endif %}
{% for message in turns %}
    {% set text = (preamble if loop.first else '') + message['content'] %}
    {% if message['role'] == 'user' %}
        {{ bos_token + '[INST] ' + text.strip() + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
        {{ ' ' + text.strip() + ' ' + eos_token }}
    {% endif %}
{% endfor %}
"""

# Llama-2-chat's template as the model's tokenizer_config.json ships it (one line, no layout whitespace): the answer
# follows `[/INST]` after one space, which the answer's first token absorbs (`▁Lisbon`).
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set turns = messages[1:] %}{% set preamble = '<<SYS>>\n' + "
    "messages[0]['content'] + '\n<</SYS>>\n\n' %}{% else %}{% set turns = messages %}{% set preamble = '' %}"
    "{% endif %}{% for message in turns %}{% set text = (preamble if loop.first else '') + message['content'] %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + text.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + text.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# name -> (template, bos, eos, other special tokens, tokenizer kind, the token that ends an assistant answer)
FAMILIES = {
    "chatml": (CHATML_TOOLS, None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>", "<tool_call>", "</tool_call>"],
               "byte_level", "<|im_end|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>",
               "<|end_of_text|>"], "tiktoken", "<|eot_id|>"),
    "mistral": (MISTRAL, "<s>", "</s>", ["[INST]", "[/INST]"], "metaspace", "</s>"),
    "gemma": (GEMMA, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], "gemma", "<end_of_turn>"),
    "phi3": (PHI3, "<s>", "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "llama2", "<|end|>"),
}

# Llama-3's pre-tokenizer pattern (tiktoken cl100k style).
_TIKTOKEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                   r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _backend(kind: str, specials: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind in ("byte_level", "tiktoken"):
        backend = Tokenizer(models.BPE())
        if kind == "tiktoken":
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_TIKTOKEN_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-style: `▁` marks spaces, bytes fall back to <0xNN>
        backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        if kind == "metaspace":
            backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
            backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        else:
            steps = [normalizers.Prepend("▁")] if kind == "llama2" else []
            backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
            backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                                + ([decoders.Strip(" ", 1, 0)] if kind == "llama2" else []))
        alphabet = ["\n"]
        specials = ["<unk>"] + [f"<0x{i:02X}>" for i in range(256)] + specials
        if kind != "metaspace":  # SentencePiece learns no merge across a word start: train split at `▁`, run unsplit
            backend.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=len(specials) + 400, special_tokens=specials, initial_alphabet=alphabet,
                                  min_frequency=2, show_progress=False)
    backend.train_from_iterator(CORPUS * 3, trainer=trainer)
    if kind in ("gemma", "llama2"):
        backend.pre_tokenizer = None
    return backend


@functools.lru_cache(maxsize=None)
def _family_tokenizer(name: str):
    from transformers import PreTrainedTokenizerFast

    template, bos, eos, others, kind, _ = FAMILIES[name]
    specials = [t for t in (bos, eos) if t] + others
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_backend(kind, specials), bos_token=bos, eos_token=eos,
        unk_token="<unk>" if kind in ("metaspace", "gemma", "llama2") else None,
        additional_special_tokens=[t for t in others], chat_template=template, clean_up_tokenization_spaces=False,
    )
    return tokenizer


def family(name: str):
    """(a fresh copy of the family's tokenizer, its end-of-answer token): tests may change the copy freely."""
    import copy

    return copy.deepcopy(_family_tokenizer(name)), FAMILIES[name][5]


def with_template(name: str, template: str):
    tokenizer, _ = family(name)
    tokenizer.chat_template = template
    return tokenizer
