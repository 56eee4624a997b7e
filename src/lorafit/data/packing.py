"""Packing without cross-contamination: padding-free rows and best-fit-decreasing bins.

Packed examples are concatenated with ``position_ids`` restarting at 0 for each and no ``attention_mask``.
transformers (5.x, sdpa, eager and flex) then builds a block-diagonal causal mask from where the positions restart
(``masking_utils.find_packed_sequence_indices``, per row), and flash-attention derives ``cu_seqlens`` from the same
positions, so no token attends across examples. The batch's shape depends on the kernel:
  * flash-attention (varlen): ONE row (1, T) -- its packed path only runs at batch size 1, and costs nothing extra;
  * mask-based kernels (sdpa, eager, flex) with ``bfd``: one row per bin (B, max bin), a short bin topped up with
    pad tokens that form their own "example" (positions restarting at 0, labels ignored). The dense masked
    attention then costs B x L^2, not (B x L)^2: on an H200, 3B model, 4 x 2048 tokens, one 8k row spent half the
    step in attention (benchmarks/README.md).
Two conditions, both checked in the recipe and proven in tests/test_packing.py:
  * no KV cache during the forward (``use_cache=False``): with a cache transformers skips the packed-sequence
    detection and the examples attend to each other (logits differ by ~1.4 on the tiny model);
  * the first label of every example is masked: the model shifts labels by one over the whole row, so the last
    token of one example would otherwise be trained to predict the first token of the next.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from lorafit.data.labels import IGNORE_INDEX


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of at most ``capacity`` tokens: longest first, each into the fullest bin it fits.

    >>> best_fit_decreasing([5, 3, 4, 2, 6], 8)
    [[4, 3], [0, 1], [2]]
    """
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted: the best fit is the first that is large enough
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        position = bisect.bisect_left(free, (length, -1))
        if position < len(free):
            space, bin_index = free.pop(position)
            bins[bin_index].append(index)
            bisect.insort(free, (space - length, bin_index))
        else:
            bins.append([index])
            bisect.insort(free, (capacity - length, len(bins) - 1))
    return bins


class PackedBins(torch.utils.data.Dataset):
    """Each item is one BFD bin: its examples concatenated, with positions restarting per example."""

    def __init__(self, examples: list, capacity: int):
        self.bins = best_fit_decreasing([len(e.input_ids) for e in examples], capacity)
        self.examples = examples
        self.capacity = capacity

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> dict:
        members = [self.examples[i] for i in self.bins[index]]
        return {
            "input_ids": [t for e in members for t in e.input_ids],
            "labels": [t for e in members for t in e.labels],
            "position_ids": [p for e in members for p in range(len(e.input_ids))],
            "source_ids": [e.source for e in members for _ in e.input_ids],
        }

    def unused_fraction(self) -> float:
        """Share of the bins' capacity left empty (what padding each bin to capacity would cost)."""
        used = sum(len(e.input_ids) for e in self.examples)
        return 1 - used / (len(self.bins) * self.capacity) if self.bins else 0.0


@dataclass(frozen=True)
class PackedCollator:
    """A batch of packed features with restarting position_ids: one row (1, T) by default, or with ``pad_id`` set
    one row per feature (B, longest), topped up with pad tokens; see the module docstring.

    ``source_ids``: also return each token's training source, from a packed bin's ``source_ids`` or an example's
    ``source`` (0 on padding), so a row holding documents of several sources still attributes each token's loss."""

    pad_id: int | None = None
    source_ids: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [_row(feature) for feature in features]
        if self.pad_id is None:
            rows = [tuple(sum((row[k] for row in rows), []) for k in range(4))]
        else:
            width = max(len(row[0]) for row in rows)
            rows = [(ids + [self.pad_id] * (width - len(ids)), labels + [IGNORE_INDEX] * (width - len(ids)),
                     positions + list(range(width - len(ids))), sources + [0] * (width - len(ids)))
                    for ids, labels, positions, sources in rows]
        input_ids, labels, positions, sources = (torch.tensor([row[k] for row in rows], dtype=torch.long) for k in range(4))
        labels[positions == 0] = IGNORE_INDEX  # never predict an example's first token from the previous one
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": positions}
        if self.source_ids:
            batch["source_ids"] = sources
        return batch


def _row(feature: dict) -> tuple[list[int], list[int], list[int], list[int]]:
    ids = list(feature["input_ids"])
    sources = feature.get("source_ids") or [feature.get("source", 0)] * len(ids)
    return ids, list(feature["labels"]), list(feature.get("position_ids") or range(len(ids))), list(sources)


def packed_collator(packing: str, attn_implementation: str, pad_id: int, source_ids: bool = False) -> PackedCollator:
    """One row for flash-attention (varlen) and for ``padding_free`` (its meaning); a row per bin otherwise."""
    one_row = packing == "padding_free" or attn_implementation.startswith("flash")
    return PackedCollator(None if one_row else pad_id, source_ids)


def padding_fraction(lengths: list[int], batch_size: int, *, grouped: bool) -> float:
    """Share of pad tokens when ``lengths`` are right-padded in batches (grouped = sorted by length, roughly what
    length-grouped sampling achieves)."""
    if not lengths:
        return 0.0
    ordered = sorted(lengths, reverse=True) if grouped else list(lengths)
    padded = sum(max(ordered[i : i + batch_size]) * len(ordered[i : i + batch_size]) for i in range(0, len(ordered), batch_size))
    return 1 - sum(lengths) / padded
