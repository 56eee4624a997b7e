"""The data layer: read sources, render with the chat template, label, filter by length, batch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from lorafit.config import DataConfig, DataSource
from lorafit.data.labels import IGNORE_INDEX, TokenizedExample, tokenize_conversation
from lorafit.data.messages import read_messages_jsonl
from lorafit.errors import LorafitError


@dataclass
class SplitStats:
    """What happened to one split's rows; written to the run folder and printed."""

    rows: int = 0
    kept: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    dropped_no_supervision: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    sources: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class TokenizedDataset(torch.utils.data.Dataset):
    """A list of tokenised examples in the dict form Trainer and the collator expect."""

    def __init__(self, examples: list[TokenizedExample]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        return {"input_ids": example.input_ids, "labels": example.labels}


def prepare_split(sources: list[DataSource], tokenizer, data: DataConfig, *, train_on_inputs: bool, split: str):
    """Read, tokenise and length-filter every source of a split. Returns (dataset, stats)."""
    examples: list[TokenizedExample] = []
    stats = SplitStats(sources=[s.path for s in sources])
    for source in sources:
        for conversation in read_messages_jsonl(source.path):
            stats.rows += 1
            where = f"{conversation.source}:{conversation.line}"
            example = tokenize_conversation(tokenizer, conversation.messages, train_on_inputs=train_on_inputs, where=where)
            if len(example.input_ids) > data.max_seq_length:
                if data.truncation == "drop":
                    stats.dropped_too_long += 1
                    continue
                stats.truncated += 1
                limit = data.max_seq_length
                example = TokenizedExample(example.input_ids[:limit], example.labels[:limit])
            if example.num_supervised == 0:
                stats.dropped_no_supervision += 1
                continue
            examples.append(example)
            stats.tokens += len(example.input_ids)
            stats.supervised_tokens += example.num_supervised
    stats.kept = len(examples)
    if not examples and sources:
        raise LorafitError(
            f"data.{split}: no usable example out of {stats.rows} rows "
            f"({stats.dropped_too_long} longer than data.max_seq_length={data.max_seq_length}, "
            f"{stats.dropped_no_supervision} with no supervised token)",
            fix="raise data.max_seq_length, or set data.truncation: truncate",
        )
    return TokenizedDataset(examples), stats


__all__ = ["IGNORE_INDEX", "SplitStats", "TokenizedDataset", "prepare_split"]
