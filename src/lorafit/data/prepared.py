"""What every kind of data preparation returns (``PreparedData``) and the counting it shares: split totals,
"nothing usable" errors and the notes on rows the length limit touched. Torch-free (data.precheck imports the
data package)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from lorafit.config import DataConfig
from lorafit.data.sources import SourceStats
from lorafit.errors import LorafitError

if TYPE_CHECKING:  # torch is not imported at run time here
    import torch
    from lorafit.data.sources import Example


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


def prepare_sources(data, load, *, seed: int, what: str, format_name: str, dataset, audit=None,
                    enforce_audit: bool = True, report: dict | None = None) -> PreparedData:
    """Both splits of an objective that reads its own rows (pairs, triplets, unpaired answers, prompts), every kind
    alike: ``load(source)`` -> (examples, stats, skipped rows) per source, then the same hold-out, budgets, weights,
    order and overlap check as the SFT rows (data/mixing.py), the audit, and the reports.

    ``audit(stats by split, enforce)`` -> (problems, warning lines), raising when enforced; by default the
    supervision audit of labelled rows. ``dataset``: the kind's dataset class (its collator's features)."""
    from lorafit.data.audit import supervision_audit
    from lorafit.data.mixing import split_and_mix

    loaded = {split: [load(s) for s in sources] for split, sources in (("train", data.train), ("eval", data.eval))}
    stats = {split: [s for _, s, _ in parts] for split, parts in loaded.items()}
    mixed = split_and_mix(data, {split: [examples for examples, _, _ in parts] for split, parts in loaded.items()},
                          stats, seed=seed, what=what)
    if audit is None:
        problems, audit_lines = supervision_audit(stats, data, train_on="last_assistant", enforce=enforce_audit)
    else:
        problems, audit_lines = audit(stats, enforce_audit)
    full_report = {"format": format_name, **mixed.report, "packing": "none", **(report or {}),
                   "sources": {split: [s.as_dict() for s in split_stats] for split, split_stats in stats.items()}}
    skipped = [r | {"source": s.path} for parts in loaded.values() for _, s, rows in parts for r in rows]
    return PreparedData(dataset(mixed.train), dataset(mixed.eval), mixed.train, mixed.eval, mixed.train_stats,
                        mixed.eval_stats, full_report, skipped, mixed.warnings + audit_lines, problems,
                        length_notes(full_report["sources"], data.max_seq_length))
