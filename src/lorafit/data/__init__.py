"""The data layer: read sources in any format, check, tokenise with labels (cached), mix, pack, audit.
May use: errors, hashing, run_folder, config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lorafit.config import DataConfig, DataSource
from lorafit.data.labels import IGNORE_INDEX
from lorafit.data.sources import Example, SourceData, SourceStats, read_records, tokenise_records
from lorafit.errors import LorafitError

if TYPE_CHECKING:  # torch is not imported at run time here: data.precheck must stay light (see its docstring)
    import torch


@dataclass
class SplitStats:
    """What happened to one split's rows; written to the run folder and printed."""

    rows: int = 0
    kept: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    dropped_no_supervision: int = 0
    skipped: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    sources: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


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


def add_source(stats: SplitStats, source: SourceStats) -> None:
    """Count one source's rows into its split's totals (SFT and triplet data alike)."""
    for name in ("rows", "dropped_too_long", "truncated", "dropped_no_supervision", "tokens", "supervised_tokens"):
        setattr(stats, name, getattr(stats, name) + getattr(source, name))
    stats.skipped += sum(source.skipped.values())


def nothing_usable(split: str, stats: SplitStats, data: DataConfig) -> LorafitError:
    return LorafitError(
        f"data.{split}: no usable example out of {stats.rows} rows "
        f"({stats.dropped_too_long} longer than data.max_seq_length={data.max_seq_length}, "
        f"{stats.dropped_no_supervision} with no supervised token)",
        fix="raise data.max_seq_length, or set data.truncation: truncate",
    )


def length_notes(sources: dict[str, list[dict]], max_seq_length: int) -> list[str]:
    """The lines `lorafit train` prints about rows the length limit left out or cut, per source (``sources``: the
    report's per-split lists of SourceStats dicts), as it prints skipped rows; none when the limit touched nothing."""
    notes = []
    for key, what, how in (("dropped_too_long", "dropped", ""), ("truncated", "truncated", " to that length")):
        counts = [(s["path"], s[key], s["rows"]) for split in ("train", "eval") for s in sources.get(split, ())
                  if s.get(key)]
        if counts:
            total = sum(n for _, n, _ in counts)
            notes.append(f"{what} {total} row{'s' if total > 1 else ''} longer than data.max_seq_length={max_seq_length}"
                         f"{how} ({', '.join(f'{path}: {n} of {rows}' for path, n, rows in counts)}; in data_report.json)")
    return notes


def use_configured_template(tokenizer, data: DataConfig) -> None:
    """Put the config's chat template (inline or file) on the tokenizer; it is saved with the adapter, so
    generation later renders prompts exactly as training did."""
    if data.chat_template_file:
        path = Path(data.chat_template_file)
        if not path.is_file():
            raise LorafitError(f"data.chat_template_file: {path} not found", fix="check the path (relative to the config file)")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    elif data.chat_template:
        tokenizer.chat_template = data.chat_template


def tokenisation_options(data: DataConfig) -> dict:
    return {"max_seq_length": data.max_seq_length, "truncation": data.truncation, "train_on": data.train_on,
            "curriculum_field": data.curriculum_field, "system_turn": data.system_turn}


def load_source(source: DataSource, tokenizer, data: DataConfig, *, use_cache: bool) -> SourceData:
    """A source's examples and counts, from the cache when its key matches, else read and tokenised (and stored)."""
    from lorafit.data import cache

    key = None
    if use_cache:
        if not Path(source.path).is_file():
            read_records(source)  # raises the usual "data file not found"
        key = cache.source_key(source, tokenisation_options(data), cache.tokenizer_digest(tokenizer))
        cached = cache.load(key)
        if cached is not None:
            return cached
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
    loaded = SourceData(examples, stats, skipped_rows)
    if key is not None:
        cache.store(key, loaded)
    return loaded


@dataclass
class PreparedData:
    """Both splits ready for the Trainer, and the report of how they were made."""

    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset
    train_examples: list[Example]
    eval_examples: list[Example]
    train_stats: SplitStats
    eval_stats: SplitStats
    report: dict
    skipped_rows: list[dict]
    warnings: list[str]
    audit: list[str]
    notes: list[str] = field(default_factory=list)  # printed by `train` (rows left out or cut for length)


def prepare_data(data: DataConfig, tokenizer, *, seed: int, batch_size: int, group_by_length: bool,
                 use_cache: bool = True, enforce_audit: bool = True) -> PreparedData:
    """Every source read, checked, tokenised (or taken from the cache), split, mixed and audited."""
    from lorafit.data.audit import audit_problems, audit_warnings
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
    problems = audit_problems([l.stats for l in train_loaded], train_on=data.train_on, max_seq_length=data.max_seq_length,
                              split="train")
    problems += audit_problems([l.stats for l in eval_loaded], train_on=data.train_on, max_seq_length=data.max_seq_length,
                               split="eval")
    if problems and enforce_audit and data.audit:
        raise LorafitError("the supervision audit failed before training", details=problems,
                           why="training would run but learn the wrong thing (or nothing)",
                           fix="fix the causes above; data.audit: false turns these into warnings")
    if problems:
        warnings += [f"audit: {p}" for p in problems]
    warnings += audit_warnings([l.stats for l in train_loaded + eval_loaded])

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


__all__ = ["IGNORE_INDEX", "PreparedData", "SplitStats", "TokenizedDataset", "length_notes", "prepare_data"]
