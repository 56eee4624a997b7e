"""Generation, the one implementation: `lorafit generate`, `lorafit chat`, `lorafit eval`, the generation metrics
logged during training and the base-vs-adapter comparison all answer through ``generate_replies``.

transformers' ``generate`` does the decoding; this module renders prompts with the model's chat template, picks
every end-of-turn id to stop at, batches prompts with left padding and turns the KV cache back on (training
switches it off in the model config). Greedy unless a temperature is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.config import ModelConfig
from lorafit.data.collate import left_padded
from lorafit.data.formats import RowError
from lorafit.data.labels import end_of_turn_token, special_token_strings
from lorafit.data.templates import render
from lorafit.errors import LorafitError
from lorafit.evaluate.progress import track
from lorafit.model.loading import load_base_model, load_tokenizer, resolve_model_path
from lorafit.model.resolved import DTYPES

# Chat templates end a turn with a token of their own that is often not the tokenizer's EOS (ChatML's <|im_end|>
# with EOS <|endoftext|>, Llama 3's <|eot_id|> with EOS <|end_of_text|>). Generation must stop at it too, or the
# model writes the next turn itself. Counted only when the template uses it and the vocabulary has it.


@dataclass(frozen=True)
class Reply:
    text: str
    token_ids: list[int]  # what was generated, the end-of-turn id included when it stopped there
    stopped_at_end_of_turn: bool

    def as_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "stopped_at_end_of_turn": self.stopped_at_end_of_turn}


def render_prompt(tokenizer, messages) -> str:
    if not tokenizer.chat_template:
        raise LorafitError(
            "the tokenizer has no chat template",
            why="lorafit generates chat turns exactly as they were formatted in training",
            fix="use a model folder (or adapter folder) whose tokenizer_config.json has a chat_template",
        )
    try:
        return render(tokenizer, messages, add_generation_prompt=True)
    except RowError as error:
        raise LorafitError(error.message, fix="give the conversation in a form the template accepts (data.system_turn "
                           "merges or drops a system turn for templates without a system role)") from None


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every end-of-turn id: the tokenizer's EOS, each eos_token_id of the generation config, then the token the
    chat template closes an assistant turn with, in that order, without repeats. The last is found the way training
    labels it (``data.labels.end_of_turn_token``, a probe conversation rendered once per template), so generation
    stops exactly where the model was taught to end an answer, for any template."""
    configured = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    candidates = [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]
    if isinstance(tokenizer.chat_template, str):
        end_of_turn = end_of_turn_token(tokenizer, special_token_strings(tokenizer))
        candidates.append(tokenizer.get_vocab().get(end_of_turn) if end_of_turn else None)
    ids: list[int] = []
    for value in candidates:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    if not ids:
        raise LorafitError("the model defines no end-of-turn token (no eos_token in the tokenizer or generation config)",
                           fix="set eos_token in tokenizer_config.json")
    return ids


def generation_config(model):
    """The generation config of a plain model or of a PeftModel's base (peft forwards the attribute)."""
    return getattr(model, "generation_config", None)


def until_stop(new_ids: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    """The generated ids up to and including the first end-of-turn id (rows that finished early are padded after
    it), and whether there was one."""
    end = next((i for i, token in enumerate(new_ids) if token in stop_ids), None)
    return (new_ids, False) if end is None else (new_ids[: end + 1], True)


def _reply(tokenizer, new_ids: list[int], stop_ids: list[int]) -> Reply:
    kept, stopped = until_stop(new_ids, stop_ids)
    text_ids = kept[:-1] if stopped else kept
    return Reply(tokenizer.decode(text_ids, skip_special_tokens=True).strip(), kept, stopped)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (``temperature`` 0), or drawn from the distribution divided by
    ``temperature`` and cut to its ``top_p`` mass. ``top_k``: None keeps the model's generation-config value (what
    `lorafit generate` has always sampled with); 0 switches it off, so a sample comes from exactly the tempered
    distribution (GRPO scores the answers with those probabilities)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False}
        kwargs = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        return kwargs if self.top_k is None else {**kwargs, "top_k": self.top_k}


@torch.no_grad()
def generate_from_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                      stop_ids: list[int], pad_id: int, sampling: Sampling = Sampling()) -> torch.Tensor:
    """The ids generated after left-padded prompts (B, new), stopped at every end-of-turn id, with the KV cache on
    and the model in eval mode (its mode is restored afterwards). Sampling draws from torch's global generator:
    callers that need a particular stream seed it (``generate_replies``, or training under ``fork_rng``)."""
    was_training = model.training
    model.eval()
    try:
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True,
                                **sampling.generate_kwargs())  # (B, T + new)
    finally:
        model.train(was_training)
    return output[:, input_ids.shape[1]:]


@torch.no_grad()
def generate_replies(model, tokenizer, conversations, *, max_new_tokens: int, batch_size: int = 16,
                     temperature: float = 0.0, seed: int = 0, stop_ids: list[int] | None = None) -> list[Reply]:
    """The assistant's next turn for each conversation: chat-templated, batched with left padding, stopped at
    every end-of-turn id; greedy unless ``temperature`` > 0. Batched greedy answers equal one-at-a-time ones."""
    stop_ids = stop_ids or stop_token_ids(tokenizer, generation_config(model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    prompts = [tokenizer(render_prompt(tokenizer, m), add_special_tokens=False)["input_ids"] for m in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together: less padding
    sampling = Sampling(temperature=temperature)
    replies: list[Reply | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    for start in track(range(0, len(order), batch_size), "generation", unit="batches"):
        rows = order[start: start + batch_size]
        input_ids, attention_mask = left_padded([prompts[i] for i in rows], pad_id)
        new = generate_from_ids(model, input_ids.to(device), attention_mask.to(device), max_new_tokens=max_new_tokens,
                                stop_ids=stop_ids, pad_id=pad_id, sampling=sampling)
        for r, i in enumerate(rows):
            replies[i] = _reply(tokenizer, new[r].tolist(), stop_ids)
    return replies


@dataclass
class Generator:
    """A loaded model (adapter on its base, or a standalone model) and its tokenizer, for generate and chat."""

    model: object
    tokenizer: object
    stop_ids: list[int]

    def reply(self, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0,
              seed: int = 0) -> dict:
        """The assistant's next turn for ``messages``: text, token ids, and whether it ended at end-of-turn."""
        (reply,) = generate_replies(self.model, self.tokenizer, [messages], max_new_tokens=max_new_tokens,
                                    batch_size=1, temperature=temperature, seed=seed, stop_ids=self.stop_ids)
        return reply.as_dict()


def load_generator(*, adapter: str | Path | None = None, model: str | Path | None = None, base: str | Path | None = None,
                   dtype: str = "fp32") -> Generator:
    """An adapter (run, artifact or adapter folder) on its full-precision base, or a standalone (e.g. merged) model."""
    if (adapter is None) == (model is None):
        raise LorafitError("give exactly one of --adapter DIR or --model DIR")
    if adapter is not None:
        from lorafit.model.adapters import load_adapter_model, resolve_adapter

        resolved = resolve_adapter(adapter, base)
        net = load_adapter_model(resolved, dtype=dtype)
        tokenizer = resolved.load_tokenizer()
    else:
        folder = resolve_model_path(ModelConfig(path=str(Path(model).expanduser().resolve())))
        net = load_base_model(ModelConfig(path=folder, dtype=dtype), folder)
        tokenizer = load_tokenizer(ModelConfig(path=folder), folder)
    net.config.use_cache = True  # load_base_model turns it off for training; generation wants the cache
    if torch.cuda.is_available():
        net = net.to("cuda")
    net.eval()
    return Generator(net, tokenizer, stop_token_ids(tokenizer, generation_config(net)))


def read_prompts(path: Path) -> list[list[dict]]:
    """prompts.jsonl: one object per line, {"prompt": "..."} or {"messages": [...]} (conversation so far)."""
    path = Path(path)
    if not path.is_file():
        raise LorafitError(f"{path}: prompts file not found")
    conversations = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LorafitError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            conversations.append([{"role": "user", "content": row["prompt"]}])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
            conversations.append(row["messages"])
        else:
            raise LorafitError(f"{path}:{number}: expected {{\"prompt\": \"...\"}} or {{\"messages\": [...]}}",
                               fix="one JSON object per line with a prompt string or a messages list")
    if not conversations:
        raise LorafitError(f"{path}: no prompts in the file")
    return conversations


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise LorafitError(f"--dtype {dtype}: unknown", fix=f"use one of {', '.join(DTYPES)}")
    return dtype
