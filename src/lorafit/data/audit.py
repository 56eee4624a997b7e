"""The supervision audit: catch the silent failures before a single step is trained.

  * a source with zero supervised tokens (every label masked: the run would train nothing on it);
  * an assistant turn whose end-of-turn token is not supervised (the model never learns to stop);
  * more than half of a source's examples over max_seq_length (dropped or truncated: the length is wrong);
  * assistant turns whose generation prompt tokenises differently from the tokens training puts before the answer
    (a token straddles the end of the generation prompt: the model would be asked to continue a prompt it never saw).

Warnings only: a generation prompt that differs from the conversation in whitespace alone (indented template files,
layout whitespace before each answer in raw templates without a generation-prompt block), and rows that still hold
`{{name}}` placeholders after the source's ``vars`` were filled in.
"""

from __future__ import annotations

from lorafit.data.sources import SourceStats
from lorafit.errors import LorafitError
from lorafit.data.variables import placeholder_warnings


def mostly_too_long(s: SourceStats, rows: str) -> str | None:
    """"<path>: N of M <rows> (P%) are longer than" when more than half of a source's readable rows were over the
    length limit (dropped or truncated: the length is wrong, not a few outliers); None otherwise."""
    over, read = s.truncated + s.dropped_too_long, s.rows - sum(s.skipped.values())
    if read and over / read > 0.5:
        return f"{s.path}: {over} of {read} {rows} ({100 * over / read:.0f}%) are longer than"
    return None


def audit_problems(stats: list[SourceStats], *, train_on: str, max_seq_length: int, split: str) -> list[str]:
    problems = []
    for s in stats:
        if s.supervised_tokens == 0:
            problems.append(f"{s.path}: no supervised token in this {split} source: its {s.rows} rows train nothing "
                            f"(data.train_on: {train_on}; fix: check the format/field map, or the length limit)")
        if s.unterminated_turns:
            problems.append(f"{s.path}: {s.unterminated_turns} assistant turn(s) have no supervised end-of-turn token: "
                            "the model would never learn to stop (the chat template puts no special token after the "
                            "answer; fix: use a template that ends turns with the tokenizer's EOS or an end-of-turn token)")
        if s.prompt_mismatch_turns:
            problems.append(f"{s.path}: {s.prompt_mismatch_turns} assistant turn(s) start with a token that straddles the "
                            "end of the generation prompt: at inference the prompt tokenises differently from training "
                            "(fix: end the template's generation prompt where a token boundary is, e.g. after a newline "
                            "or special token rather than a space)")
        too_long = mostly_too_long(s, "examples")
        if too_long:
            problems.append(f"{too_long} data.max_seq_length={max_seq_length} and were "
                            f"{'truncated' if s.truncated else 'dropped as too long'} "
                            f"(fix: raise data.max_seq_length; `lorafit data inspect` shows the length histogram)")
    return problems


def audit_warnings(stats: list[SourceStats]) -> list[str]:
    return placeholder_warnings(stats) + [f"{s.path}: {s.prompt_whitespace_turns} assistant turn(s) have a generation prompt that differs from the "
            "conversation in whitespace only (usually a template file with indentation and a newline after a `{{ ... }}` "
            "line, or indentation before each answer); labels are right (they start at the answer's first character), "
            "but at inference the prompt ends differently from training (fix: write the template with "
            "`{{- ... }}`/`{%- ... %}` or without the newlines)"
            for s in stats if s.prompt_whitespace_turns]


def supervision_audit(stats: dict[str, list[SourceStats]], data, *, train_on: str, enforce: bool
                      ) -> tuple[list[str], list[str]]:
    """The audit over every source of both splits (``stats["train"]``, ``stats["eval"]``), for every objective whose
    rows carry labels: (problems, warning lines). Raises when there are problems, ``enforce`` is on (a run; inspect,
    plan and doctor report instead) and ``data.audit`` is on."""
    problems = [p for split in ("train", "eval")
                for p in audit_problems(stats.get(split, []), train_on=train_on, max_seq_length=data.max_seq_length,
                                        split=split)]
    if problems and enforce and data.audit:
        raise LorafitError("the supervision audit failed before training", details=problems,
                           why="training would run but learn the wrong thing (or nothing)",
                           fix="fix the causes above; data.audit: false turns these into warnings")
    warnings = [f"audit: {p}" for p in problems] + audit_warnings([s for split in stats.values() for s in split])
    return problems, warnings
