"""Loss on eval data, tokenised exactly as training tokenises it, so the number is the one training logs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.config import DataSource
from lorafit.data import TokenizedDataset
from lorafit.data.collate import PadCollator
from lorafit.data.sources import SourceStats, tokenise_records
from lorafit.evaluate.examples import EvalExample, source_records
from lorafit.evaluate.progress import track
from lorafit.model.token_logprobs import next_token_logprobs


@dataclass(frozen=True)
class LossSettings:
    """How eval data is tokenised for the loss: the ``data`` options of the training run being measured."""

    max_seq_length: int = 1024
    truncation: str = "truncate"
    train_on: str = "all_assistant"

    @classmethod
    def from_training_config(cls, config: dict | None, **given) -> "LossSettings":
        """The training config's data options (training_config.yaml), each overridden by a non-None ``given``."""
        data = (config or {}).get("data") or {}
        defaults = cls()
        values = {name: given.get(name) if given.get(name) is not None else data.get(name, getattr(defaults, name))
                  for name in ("max_seq_length", "truncation", "train_on")}
        return cls(**values)


@torch.no_grad()
def example_losses(model, dataset, *, batch_size: int, pad_token_id: int) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, supervised token count) of every example of a tokenised dataset.

    The token log-probabilities are training's (model/token_logprobs.py: float32 one chunk at a time, never a
    float32 copy of batch x tokens x vocabulary); the per-row sums stay on the device and are read once, at the end."""
    collate = PadCollator(pad_token_id)
    device = next(model.parameters()).device
    sums, counts = [], []
    for start in track(range(0, len(dataset), batch_size), "loss", unit="batches"):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        logps, mask = next_token_logprobs(logits, batch["labels"])  # (B, T): token t + 1 predicted at t
        sums.append(-logps.sum(-1).double())
        counts.append(mask.sum(-1))
    if not sums:
        return []
    return list(zip(torch.cat(sums).tolist(), torch.cat(counts).tolist()))  # one read of the device


def loss_by_source(model, tokenizer, sources: list[DataSource], examples: list[EvalExample], *,
                   settings: LossSettings, batch_size: int) -> dict[str, tuple[float, int]]:
    """{source: (summed NLL, tokens)}, tokenised as training does (same labels, same length policy).

    Each tokenised row is matched to its example by place (``file:line``), so a row's ``source`` field names its
    group even when the length policy dropped other rows; rows with no example (plain text) count for their file.
    """
    source_of = {e.where: e.source for e in examples}
    totals: dict[str, list] = {}
    for source in sources:
        tokenised = tokenise_records(source_records(source), tokenizer, max_seq_length=settings.max_seq_length,
                                     truncation=settings.truncation, train_on=settings.train_on,
                                     stats=SourceStats(path=source.path))
        losses = example_losses(model, TokenizedDataset(tokenised), batch_size=batch_size,
                                pad_token_id=tokenizer.pad_token_id)
        for example, (nll, count) in zip(tokenised, losses):
            entry = totals.setdefault(source_of.get(example.where, Path(source.path).name), [0.0, 0])
            entry[0] += nll
            entry[1] += count
    return {source: (nll, count) for source, (nll, count) in totals.items()}
