"""Mixing several training sources: held-out eval fractions, budgets, weights, order. Deterministic for a seed.

Every random choice draws from ``random.Random`` seeded with the run seed and the source's position, so the same
config gives the same examples in the same order on every machine, and adding a source does not reshuffle the
others' budgets.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from lorafit.data.sources import Example


def rng_for(seed: int, *parts: object) -> random.Random:
    return random.Random(":".join(map(str, (seed, *parts))))


def hold_out(examples: list[Example], fraction: float, rng: random.Random) -> tuple[list[Example], list[Example]]:
    """(train, eval): a random ``fraction`` of the examples (at least one when fraction > 0) goes to eval."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    count = min(max(1, round(fraction * len(examples))), len(examples) - 1)
    chosen = set(rng.sample(range(len(examples)), count))
    return ([e for i, e in enumerate(examples) if i not in chosen], [e for i, e in enumerate(examples) if i in chosen])


def apply_budget(examples: list[Example], rng: random.Random, *, max_examples: int | None,
                 max_tokens: int | None) -> list[Example]:
    """A random subset within the example and token budgets (the original order is kept)."""
    if max_examples is None and max_tokens is None:
        return examples
    order = list(range(len(examples)))
    rng.shuffle(order)
    kept, tokens = [], 0
    for index in order:
        if max_examples is not None and len(kept) >= max_examples:
            break
        length = len(examples[index].input_ids)
        if max_tokens is not None and tokens + length > max_tokens:
            continue  # a shorter example may still fit
        kept.append(index)
        tokens += length
    return [examples[i] for i in sorted(kept)]


def quotas(sizes: list[int], weights: list[float], total: int) -> list[int]:
    """Split ``total`` in proportion to ``weights`` (largest remainder, so the counts sum to ``total`` exactly).

    >>> quotas([10, 10, 10], [1, 2, 1], 100)
    [25, 50, 25]
    """
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    for index in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: total - sum(counts)]:
        counts[index] += 1
    return counts


def resample(examples: list[Example], count: int, rng: random.Random) -> list[Example]:
    """``count`` examples: whole copies when up-sampling plus a random remainder, a random subset when down-sampling."""
    copies, remainder = divmod(count, len(examples))
    return examples * copies + [examples[i] for i in sorted(rng.sample(range(len(examples)), remainder))]


@dataclass
class MixReport:
    """Per source: examples available after budgets, and how many the mix drew (up- or down-sampled)."""

    available: list[int] = field(default_factory=list)
    drawn: list[int] = field(default_factory=list)
    weights: list[float | None] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def mix(per_source: list[list[Example]], weights: list[float | None], *, total: int | None, seed: int,
        order: str) -> tuple[list[Example], MixReport]:
    """One training list from several sources, in shuffled or curriculum order."""
    sizes = [len(examples) for examples in per_source]
    report = MixReport(available=sizes, weights=list(weights))
    if all(w is not None for w in weights) and len(per_source) > 0:
        counts = quotas(sizes, [float(w) for w in weights], total or sum(sizes))
        drawn = [resample(ex, n, rng_for(seed, "mix", i)) if ex else [] for i, (ex, n) in enumerate(zip(per_source, counts))]
    else:
        drawn = per_source
    report.drawn = [len(d) for d in drawn]
    mixed = [example for examples in drawn for example in examples]
    if order == "curriculum":
        # Stable: equal keys keep source order, so the curriculum is as deterministic as the shuffle.
        mixed.sort(key=lambda e: e.rank if e.rank is not None else len(e.input_ids))
    else:
        rng_for(seed, "order").shuffle(mixed)
    return mixed, report


def overlap(train: list[Example], evaluation: list[Example]) -> int:
    """How many eval examples have a conversation identical to a training one."""
    seen = {e.identity for e in train}
    return sum(e.identity in seen for e in evaluation)


@dataclass
class SplitExamples:
    """Both splits after hold-out, budgets and mixing, with their counts (``split_and_mix``)."""

    train: list
    eval: list
    train_stats: object  # lorafit.data.SplitStats
    eval_stats: object
    report: dict  # train/eval counts, mix, held_out_for_eval, train_eval_overlap
    warnings: list[str]


def split_and_mix(data, loaded: dict[str, list[list]], stats: dict[str, list], *, seed: int,
                  what: str = "examples") -> SplitExamples:
    """Examples of objectives that read their own rows (triplets, preference pairs), per split and source
    (``loaded["train"][i]``: source i's examples; ``stats`` the sources' SourceStats alike), through the same
    hold-out, budgets, weights, order and overlap check as ``prepare_data``. Raises when a split is left empty."""
    from lorafit.data.prepared import SplitStats, add_source, nothing_usable

    per_source, held_out = [], []
    for i, (source, examples) in enumerate(zip(data.train, loaded["train"])):
        train_part, eval_part = hold_out(examples, source.eval_fraction, rng_for(seed, "hold_out", i))
        held_out += eval_part
        per_source.append(apply_budget(train_part, rng_for(seed, "budget", i), max_examples=source.max_examples,
                                       max_tokens=source.max_tokens))
    train, mix_report = mix(per_source, [s.weight for s in data.train], total=data.mix_examples, seed=seed,
                            order=data.order)
    evaluation = [e for i, (source, examples) in enumerate(zip(data.eval, loaded["eval"]))
                  for e in apply_budget(examples, rng_for(seed, "eval_budget", i), max_examples=source.max_examples,
                                        max_tokens=source.max_tokens)] + held_out
    split_stats = {}
    for split, sources in (("train", data.train), ("eval", data.eval)):
        split_stats[split] = SplitStats(sources=[s.path for s in sources])
        for source_stats in stats[split]:
            add_source(split_stats[split], source_stats)
    split_stats["train"].kept, split_stats["eval"].kept = len(train), len(evaluation)
    if not train:
        raise nothing_usable("train", split_stats["train"], data)
    if data.eval and not evaluation:
        raise nothing_usable("eval", split_stats["eval"], data)
    duplicated = overlap(train, evaluation)
    warnings = [f"{duplicated} of {len(evaluation)} eval {what} are identical to training {what}: eval metrics "
                "will look better than they are"] if duplicated else []
    report = {"train": split_stats["train"].as_dict(), "eval": split_stats["eval"].as_dict(),
              "mix": mix_report.as_dict(), "held_out_for_eval": len(held_out), "train_eval_overlap": duplicated}
    return SplitExamples(train, evaluation, split_stats["train"], split_stats["eval"], report, warnings)
