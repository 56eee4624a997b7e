"""Batching: right-pad a list of tokenised examples into tensors.

Padding is masked by position (attention_mask 0, label IGNORE_INDEX), never by token id, so a model whose
pad and EOS ids are the same still learns to emit EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafit.data.labels import IGNORE_INDEX


@dataclass(frozen=True)
class PadCollator:
    """``source_ids``: also return each token's training source (B, T) from the features' ``source`` (0 where
    absent, and on padding): the training loss per source reads it; the model never sees it."""

    pad_token_id: int
    source_ids: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)  # (B, T)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if self.source_ids:
            batch["source_ids"] = torch.tensor([f.get("source", 0) for f in features], dtype=torch.long)[:, None] * attention_mask
        return batch


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts right-aligned so that generation starts at the same column in every row: (input_ids, attention_mask),
    both (B, T)."""
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)  # (B, T)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, longest - len(prompt):] = 1
    return input_ids, attention_mask
