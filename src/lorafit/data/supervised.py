"""The supervised (SFT) rows: each source read, tokenised with labels (cached), split, mixed, packed and audited
into a ``PreparedData``. The other objectives' rows are prepared in their own modules; data/prepare.py is the one
entry that picks by objective."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from lorafit.config import DataConfig, DataSource
from lorafit.data.prepared import PreparedData, SplitStats, add_source, length_notes, nothing_usable
from lorafit.data.sources import Example, SourceData, read_records, tokenisation_options, tokenise_records
from lorafit.errors import LorafitError

if TYPE_CHECKING:
    import torch


class TokenizedDataset:
    """A list of tokenised examples in the dict form Trainer and the collator expect.

    A map-style dataset by protocol (``__len__`` and ``__getitem__``, all DataLoader needs), not by subclassing
    torch's Dataset, so that importing the data package does not import torch."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        return {"input_ids": example.input_ids, "labels": example.labels, "source": example.source}


def load_source(source: DataSource, tokenizer, data: DataConfig, *, use_cache: bool) -> SourceData:
    """A source's examples and counts, from the cache when its key matches, else read and tokenised (and stored)."""
    from lorafit.data.cache import cached_source

    examples, stats, skipped = cached_source(source, tokenizer, {"kind": "sft", **tokenisation_options(data)},
                                             lambda: _tokenised(source, tokenizer, data), use_cache=use_cache, cls=Example)
    return SourceData(examples, stats, skipped)


def _tokenised(source: DataSource, tokenizer, data: DataConfig):
    records, stats, skipped_rows = read_records(source, rank_field=data.curriculum_field)
    if any(r.text is None for r in records) and not getattr(tokenizer, "chat_template", None):
        raise LorafitError(
            f"{source.path}: {stats.format} rows need a chat template and the tokenizer has none",
            why="conversations are rendered with a chat template so that training matches inference",
            fix="set data.chat_template (inline Jinja) or data.chat_template_file in the config, or use a model "
            "folder whose tokenizer defines one",
        )
    examples = tokenise_records(records, tokenizer, max_seq_length=data.max_seq_length, truncation=data.truncation,
                                train_on=data.train_on, stats=stats, system_turn=data.system_turn,
                                on_error=source.on_error, max_skip_fraction=source.max_skip_fraction,
                                skipped_rows=skipped_rows)
    return examples, stats, skipped_rows


def prepare_data(data: DataConfig, tokenizer, *, seed: int, batch_size: int, group_by_length: bool,
                 use_cache: bool = True, enforce_audit: bool = True) -> PreparedData:
    """Every source read, checked, tokenised (or taken from the cache), split, mixed and audited."""
    from lorafit.data.audit import supervision_audit
    from lorafit.data.mixing import apply_budget, hold_out, mix, overlap, rng_for
    from lorafit.data.packing import PackedBins, padding_fraction

    train_loaded = [load_source(s, tokenizer, data, use_cache=use_cache) for s in data.train]
    eval_loaded = [load_source(s, tokenizer, data, use_cache=use_cache) for s in data.eval]

    per_source, held_out = [], []
    for i, (source, loaded) in enumerate(zip(data.train, train_loaded)):
        train_part, eval_part = hold_out(loaded.examples, source.eval_fraction, rng_for(seed, "hold_out", i))
        held_out += eval_part
        kept = apply_budget(train_part, rng_for(seed, "budget", i), max_examples=source.max_examples,
                            max_tokens=source.max_tokens)
        per_source.append([replace(e, source=i) for e in kept])  # for the training loss per source
    train_examples, mix_report = mix(per_source, [s.weight for s in data.train], total=data.mix_examples, seed=seed,
                                     order=data.order)
    eval_examples = [e for i, (source, loaded) in enumerate(zip(data.eval, eval_loaded))
                     for e in apply_budget(loaded.examples, rng_for(seed, "eval_budget", i),
                                           max_examples=source.max_examples, max_tokens=source.max_tokens)] + held_out

    train_stats, eval_stats = SplitStats(sources=[s.path for s in data.train]), SplitStats(sources=[s.path for s in data.eval])
    for loaded in train_loaded:
        add_source(train_stats, loaded.stats)
    for loaded in eval_loaded:
        add_source(eval_stats, loaded.stats)
    train_stats.kept, eval_stats.kept = len(train_examples), len(eval_examples)
    if not train_examples:
        raise nothing_usable("train", train_stats, data)
    if data.eval and not eval_examples:
        raise nothing_usable("eval", eval_stats, data)

    warnings = []
    duplicated = overlap(train_examples, eval_examples)
    if duplicated:
        warnings.append(f"{duplicated} of {len(eval_examples)} eval examples are identical to training examples: "
                        "eval loss will look better than it is (remove them from the eval data)")
    problems, audit_lines = supervision_audit({"train": [l.stats for l in train_loaded],
                                               "eval": [l.stats for l in eval_loaded]},
                                              data, train_on=data.train_on, enforce=enforce_audit)
    warnings += audit_lines

    lengths = [len(e.input_ids) for e in train_examples]
    train_set: torch.utils.data.Dataset = TokenizedDataset(train_examples)
    packed_padding = 0.0
    if data.packing == "bfd":
        train_set = PackedBins(train_examples, data.max_seq_length)
        packed_padding = train_set.unused_fraction()
    report = {
        "train": train_stats.as_dict(),
        "eval": eval_stats.as_dict(),
        "sources": {"train": [l.stats.as_dict() for l in train_loaded], "eval": [l.stats.as_dict() for l in eval_loaded]},
        "mix": mix_report.as_dict(),
        "held_out_for_eval": len(held_out),
        "train_eval_overlap": duplicated,
        "packing": data.packing,
        "padding_fraction": {
            "padded": round(padding_fraction(lengths, batch_size, grouped=group_by_length), 4),
            "packed": round(packed_padding, 4),
        },
    }
    if data.packing == "bfd":
        report["packed_rows"] = len(train_set)
    return PreparedData(train_set, TokenizedDataset(eval_examples), train_examples, eval_examples, train_stats, eval_stats,
                        report, [r | {"source": l.stats.path} for l in train_loaded + eval_loaded for r in l.skipped_rows],
                        warnings, problems, length_notes(report["sources"], data.max_seq_length))
