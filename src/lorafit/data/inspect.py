"""`lorafit data inspect`: what the data layer makes of a config's data, before any training.

Per source: rows read, kept and skipped (by reason), token lengths (min, median, p95, max), the supervised share,
truncated count and padding with and without packing; then the audit and one example with its trained tokens
marked. The same content is printed for people or as one JSON document.
"""

from __future__ import annotations

import statistics

from lorafit.config import Config
from lorafit.data.supervised import load_source, prepare_data
from lorafit.data.labels import IGNORE_INDEX
from lorafit.data.packing import PackedBins, padding_fraction


def lengths_summary(lengths: list[int]) -> dict:
    if not lengths:
        return {"min": 0, "median": 0, "p95": 0, "max": 0}
    ordered = sorted(lengths)
    return {"min": ordered[0], "median": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], "max": ordered[-1]}


def marked_pieces(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The example's text in runs of (text, trained), decoded run by run so multi-byte characters stay whole."""
    pieces: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            pieces.append((tokenizer.decode(input_ids[start:i]), labels[start] != IGNORE_INDEX))
            start = i
    return pieces


def warning_and_audit_lines(report: dict) -> list[str]:
    """The warnings and the audit's verdict, as every kind of row prints them."""
    lines = [f"warning: {w}" for w in report["warnings"]]
    if report["audit"]:
        lines.append("audit: FAILED" if report["audit_enforced"] else "audit: problems (data.audit is off)")
        return lines + [f"  {problem}" for problem in report["audit"]]
    return lines + ["audit: passed"]


def inspect_sft(config: Config, tokenizer, *, use_cache: bool = True) -> dict:
    """The report for supervised rows (data/prepare.py picks the report for the config's kind of rows)."""
    data, train = config.data, config.train
    prepared = prepare_data(data, tokenizer, seed=train.seed, batch_size=train.batch_size,
                            group_by_length=train.group_by_length, use_cache=use_cache, enforce_audit=False)
    sources = []
    for split, split_sources in (("train", data.train), ("eval", data.eval)):
        for source in split_sources:
            loaded = load_source(source, tokenizer, data, use_cache=use_cache)
            s = loaded.stats
            lengths = [len(e.input_ids) for e in loaded.examples]
            bins = PackedBins(loaded.examples, data.max_seq_length)
            sources.append({
                "split": split, "path": s.path, "format": s.format, "rows": s.rows, "kept": s.kept,
                "skipped": s.skipped, "dropped_too_long": s.dropped_too_long, "truncated": s.truncated,
                "dropped_no_supervision": s.dropped_no_supervision,
                "tokens": lengths_summary(lengths),
                "supervised_fraction": round(s.supervised_tokens / s.tokens, 4) if s.tokens else 0.0,
                "padding_fraction": {
                    "padded": round(padding_fraction(lengths, train.batch_size, grouped=train.group_by_length), 4),
                    "padding_free": 0.0,
                    "bfd": round(bins.unused_fraction(), 4),
                },
            })
    example = prepared.train_examples[0]
    pieces = marked_pieces(tokenizer, example.input_ids, example.labels)
    return {
        "sources": sources,
        "train_examples": len(prepared.train_examples),
        "eval_examples": len(prepared.eval_examples),
        "mix": prepared.report["mix"],
        "train_eval_overlap": prepared.report["train_eval_overlap"],
        "packing": data.packing,
        "audit": prepared.audit,
        "audit_enforced": data.audit,
        "warnings": [w for w in prepared.warnings if not w.startswith("audit: ")],
        "example": {"where": example.where, "marked": "".join(f"[[{t}]]" if on else t for t, on in pieces),
                    "pieces": [{"text": t, "trained": on} for t, on in pieces]},
    }


def render_sft(report: dict, *, colour: bool) -> str:
    import typer

    lines = []
    for s in report["sources"]:
        t, p = s["tokens"], s["padding_fraction"]
        skipped = ", ".join(f"{n} {reason}" for reason, n in s["skipped"].items()) or "none"
        lines += [
            f"{s['split']} source {s['path']} ({s['format']})",
            f"  rows {s['rows']}, kept {s['kept']}, skipped {skipped}; dropped too long {s['dropped_too_long']}, "
            f"truncated {s['truncated']}, no supervised token {s['dropped_no_supervision']}",
            f"  tokens per example: min {t['min']}, median {t['median']}, p95 {t['p95']}, max {t['max']}",
            f"  supervised fraction {s['supervised_fraction']:.1%}",
            f"  padding fraction: padded {p['padded']:.1%}, padding_free {p['padding_free']:.1%}, bfd {p['bfd']:.1%}",
        ]
    lines.append(f"mix: {report['train_examples']} train examples (per source {report['mix']['drawn']}), "
                 f"{report['eval_examples']} eval, {report['train_eval_overlap']} eval examples identical to training ones")
    lines += warning_and_audit_lines(report)
    lines.append(f"example ({report['example']['where']}); trained tokens "
                 + ("in green:" if colour else "in [[double brackets]]:"))
    if colour:
        lines.append("".join(typer.style(p["text"], fg=typer.colors.GREEN, bold=True) if p["trained"] else p["text"]
                             for p in report["example"]["pieces"]))
    else:
        lines.append(report["example"]["marked"])
    return "\n".join(lines)
