"""What a config's data makes a micro-batch, for the memory planner (model/memory_plan.py): the objective's rows
(``RowShape``, from the data entry's prepared examples), the largest micro-batch (rows x tokens), the positions the
head runs on (model/supervised_head.py) and whether sdpa gets a mask. Pure arithmetic over token counts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from lorafit.config import Config


@dataclass(frozen=True)
class RowShape:
    """What data preparation tells the planner about an objective's rows (the interface its per-objective entry
    fills): how many model rows one example makes (1: SFT, KTO; 2: a preference pair, chosen + rejected; 3: a
    contrastive triplet) and each example's token length, the longest of its rows (they are padded together);
    ``eval_lengths`` the same for the evaluation set (empty: the run does not evaluate, or, with ``evaluates``,
    its examples are planned as long as the training ones)."""

    rows_per_example: int = 1
    lengths: tuple[int, ...] = ()
    eval_lengths: tuple[int, ...] = ()
    evaluates: bool = False
    # Each training example's supervised positions (labelled next tokens, over all its rows), aligned with
    # ``lengths``: SFT's and the preference objectives' head runs on those only (model/supervised_head.py).
    # Empty: every position of a row is planned as supervised.
    supervised: tuple[int, ...] = ()


# What runs the head on its labelled positions only (model/supervised_head.py): Setup.objective kinds.
HEAD_ON_LABELS = ("sft", "preference", "kto")
# objective.type -> (Setup.objective: what its loss keeps, a no-grad reference forward each step). How many rows
# an example forwards is the data entry's (data/prepare.py: ROW_KINDS).
OBJECTIVE_LOSS = {"dpo": ("preference", True), "orpo": ("preference", False), "simpo": ("preference", False),
                  "kto": ("kto", True), "contrastive": ("contrastive", False)}


def rows_of(config: Config, prepared, kind: str) -> RowShape:
    """The ``RowShape`` of a ``PreparedData`` of any kind of row (data/prepare.py says which rows an example
    forwards): each example as long as its longest row, since a pair's or a triplet's rows are padded together."""
    from lorafit.data.labels import IGNORE_INDEX
    from lorafit.data.prepare import ROW_KINDS, forward_rows

    def labelled(labels: list[int]) -> int:  # positions whose next token is labelled
        return max(len(labels) - 1 - labels[1:].count(IGNORE_INDEX), 0)

    answers = {"sft": lambda e: labelled(e.labels), "unpaired": lambda e: labelled(e.labels),
               "preference": lambda e: labelled(e.labels) + labelled(e.rejected_labels)}.get(kind)
    supervised = tuple(answers(e) for e in prepared.train_examples) if answers else ()
    return RowShape(ROW_KINDS[kind].rows_per_example,
                    tuple(max(r) for r in forward_rows(prepared.train_examples, kind)),
                    tuple(max(r) for r in forward_rows(prepared.eval_examples, kind)),
                    evaluates=evaluates(config), supervised=supervised)


def micro_batch(lengths: list[int], *, packing: str, batch_size: int, max_seq_length: int,
                rows_per_example: int = 1) -> tuple[int, int]:
    """(rows, tokens per row) of the largest micro-batch the data makes. bfd: batch_size bins of max_seq_length
    (data.packing.packed_collator: a row per bin; flash-attention gets them joined in one row, the same tokens);
    padding_free: one row of the batch's examples (the worst batch: the longest together). Padded batches are as
    long as their longest example (length grouping puts the longest ones together); a pair or a triplet is
    ``rows_per_example`` rows of that length."""
    kept = sorted(min(n, max_seq_length) for n in lengths) or [max_seq_length]
    if packing == "bfd":
        return batch_size, min(max_seq_length, sum(kept))
    if packing == "padding_free":
        return 1, sum(kept[-batch_size:])
    return rows_per_example * min(batch_size, len(kept)), kept[-1]


def head_positions(lengths: tuple[int, ...], supervised: tuple[int, ...], *, packing: str, rows: int,
                   row_tokens: int, max_seq_length: int, rows_per_example: int = 1) -> int:
    """The most positions the supervised head (model/supervised_head.py) runs on in one micro-batch of ``rows`` x
    ``row_tokens``: a bound over every batch the data can make, not the planned batch's own count. Padded rows: the
    largest supervised counts of as many examples as the rows hold. Packed rows: the examples densest in supervised
    positions first, until their tokens fill the micro-batch (the fractional-knapsack bound). An example's count is
    at most its rows x (kept length - 1) (a row's last position has no next token); with no counts (``supervised``
    empty) every such position."""
    ordered = _by_supervision(tuple(lengths), tuple(supervised), max_seq_length, packing == "none", rows_per_example)
    if packing == "none":
        examples = max(rows // rows_per_example, 1)
        return sum(count for count, _ in ordered[:examples]) if ordered else rows * max(row_tokens - 1, 0)
    room, total = rows * row_tokens, 0.0
    for count, n in ordered:
        if room <= 0:
            break
        total += count * min(1.0, room / max(n, 1))
        room -= n
    return min(int(total), rows * max(row_tokens - 1, 0))


@functools.lru_cache(maxsize=16)
def _by_supervision(lengths: tuple[int, ...], supervised: tuple[int, ...], max_seq_length: int,
                    padded: bool, rows_per_example: int = 1) -> list[tuple[int, int]]:
    """(supervised count, kept length) per example, most supervised first (padded rows) or densest first (packed
    rows). Cached: the cheapest-fit search re-plans the same data at every batch size."""
    kept = [min(n, max_seq_length) for n in lengths]
    most = [rows_per_example * max(n - 1, 0) for n in kept]
    counts = [min(c, m) for c, m in zip(supervised, most)] if supervised else most
    if padded:
        return sorted(zip(counts, kept), reverse=True)
    return [(c, n) for _, c, n in sorted(((c / max(n, 1), c, n) for c, n in zip(counts, kept)), reverse=True)]


def sdpa_gets_a_mask(packing: str, lengths: list[int], rows: int, rows_per_example: int = 1) -> bool:
    """Whether transformers hands sdpa a 4-D mask, which keeps a bias per layer and turns GQA sharing off (keys and
    values expanded to the query heads): transformers/integrations/sdpa_attention.py:sdpa_attention_forward calls
    repeat_kv unless use_gqa_in_sdpa, which on CUDA requires attention_mask is None. Packed rows always get one:
    restarting position_ids make masking_utils.py:create_causal_mask build a block-diagonal mask
    (find_packed_sequence_indices; allow_is_causal_skip = False). Padded rows get one when some row is padded
    (masking_utils.py:_ignore_causal_mask_sdpa drops an all-ones padding mask): rows of different lengths, as
    a pair's or a triplet's rows are (planned so)."""
    if packing in ("bfd", "padding_free"):
        return True
    return rows > 1 and (rows_per_example > 1 or len(set(lengths)) > 1)


def evaluates(config: Config) -> bool:
    """Whether the run evaluates: eval sources, or a training source with an eval_fraction."""
    return bool(config.data.eval) or any(source.eval_fraction > 0 for source in config.data.train)
