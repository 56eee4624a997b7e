"""Generation from an adapter (on its base) or a standalone model: chat-templated, stops at end-of-turn.

transformers' ``generate`` does the decoding; this module picks the stop tokens, renders prompts with the
model's chat template, and turns the KV cache back on (training switches it off in the model config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.config import ModelConfig
from lorafit.errors import LorafitError
from lorafit.model.loading import DTYPES, load_base_model, resolve_model_path


@dataclass
class Generator:
    model: object
    tokenizer: object
    stop_ids: list[int]

    def reply(self, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0,
              seed: int = 0) -> dict:
        """The assistant's next turn for ``messages``: text, token ids, and whether it ended at end-of-turn."""
        prompt = render_prompt(self.tokenizer, messages)
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        device = next(self.model.parameters()).device
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            output = self.model.generate(
                **{k: v.to(device) for k, v in inputs.items()},
                max_new_tokens=max_new_tokens,
                eos_token_id=self.stop_ids,
                pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0],
                use_cache=True,
                **sampling,
            )
        new_ids = output[0, inputs["input_ids"].shape[1]:].tolist()
        stopped = bool(new_ids) and new_ids[-1] in self.stop_ids
        text_ids = new_ids[:-1] if stopped else new_ids
        return {"text": self.tokenizer.decode(text_ids, skip_special_tokens=True), "token_ids": new_ids,
                "stopped_at_end_of_turn": stopped}


def render_prompt(tokenizer, messages: list[dict]) -> str:
    if not tokenizer.chat_template:
        raise LorafitError(
            "the tokenizer has no chat template",
            why="lorafit generates chat turns exactly as they were formatted in training",
            fix="use a model folder (or adapter folder) whose tokenizer_config.json has a chat_template",
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS and every eos_token_id of the generation config, in that order."""
    ids: list[int] = []
    configured = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    for value in (tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])):
        if value is not None and value not in ids:
            ids.append(int(value))
    if not ids:
        raise LorafitError("the model defines no end-of-turn token (no eos_token in the tokenizer or generation config)",
                           fix="set eos_token in tokenizer_config.json")
    return ids


def load_generator(*, adapter: str | Path | None = None, model: str | Path | None = None, base: str | Path | None = None,
                   dtype: str = "fp32") -> Generator:
    """An adapter on its full-precision base, or a standalone (e.g. merged) model folder."""
    from transformers import AutoTokenizer

    if (adapter is None) == (model is None):
        raise LorafitError("give exactly one of --adapter DIR or --model DIR")
    if adapter is not None:
        from peft import PeftModel

        from lorafit.model.adapters import read_adapter_config, resolve_base

        adapter = Path(adapter).expanduser().resolve()
        read_adapter_config(adapter)
        base_path = resolve_base(adapter, base)
        net = load_base_model(ModelConfig(path=base_path, dtype=dtype), base_path)
        net = PeftModel.from_pretrained(net, adapter, is_trainable=False)
        tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else Path(base_path)
        generation_config = net.base_model.model.generation_config
    else:
        folder = resolve_model_path(ModelConfig(path=str(Path(model).expanduser().resolve())))
        net = load_base_model(ModelConfig(path=folder, dtype=dtype), folder)
        tokenizer_dir = Path(folder)
        generation_config = net.generation_config
    net.config.use_cache = True  # load_base_model turns it off for training; generation wants the cache
    if torch.cuda.is_available():
        net = net.to("cuda")
    net.eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return Generator(net, tokenizer, stop_token_ids(tokenizer, generation_config))


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
