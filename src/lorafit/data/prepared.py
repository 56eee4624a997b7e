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
