"""The one entry that prepares a config's data for its objective: ``prepare(config, tokenizer)``.

Each objective trains on one kind of row (``ROW_KINDS``): supervised examples, preference pairs (DPO, ORPO,
SimPO), triplets (contrastive), unpaired answers (KTO) or prompts (GRPO). The run, `lorafit data inspect`,
`lorafit plan` and `lorafit doctor` all come through here, so each of them sees the rows the run trains on, with
the same cache and the same audit. Every kind returns a ``PreparedData`` (data/prepared.py); ``forward_rows``
says which rows one example puts through the model (what the memory planner sizes).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Callable

from lorafit.data.prepared import PreparedData


@dataclass(frozen=True)
class RowKind:
    """One kind of row: where its inspect report and its rendering live, and what one example forwards."""

    name: str
    inspect: str  # "module:function" (config, tokenizer, *, use_cache) -> report
    render: str  # "module:function" (report, *, colour) -> text
    forward_rows: Callable[[object], tuple[int, ...]]  # an example -> the token lengths of the rows it forwards
    rows_per_example: int = 1  # how many rows one example puts in a batch (2 for a pair, 3 for a triplet)


def _kind(name: str, module: str, rows, per_example: int = 1) -> RowKind:
    return RowKind(name, f"{module}:inspect_{name}", f"{module}:render_{name}", rows, per_example)


ROW_KINDS = {
    "sft": _kind("sft", "lorafit.data.inspect", lambda e: (len(e.input_ids),)),
    "preference": _kind("preference", "lorafit.data.pairs",
                        lambda e: (len(e.input_ids), len(e.rejected_ids)), 2),  # chosen and rejected in one batch
    "triplets": _kind("triplets", "lorafit.data.triplets",
                      lambda e: (len(e.input_ids), len(e.cf_ids), len(e.injection_ids)), 3),  # 3n rows
    "unpaired": _kind("unpaired", "lorafit.data.unpaired", lambda e: (len(e.input_ids),)),
    "prompts": _kind("prompts", "lorafit.data.prompts", lambda e: (len(e.input_ids),)),  # + generated tokens
}


def row_kind(config, objective=None) -> str:
    """The rows ``config``'s objective trains on: the built objective's ``data`` attribute when given (the run),
    else the config's objective type, else (a plugin objective) what the data sources' format says."""
    kind = getattr(objective, "data", None) or config.objective.data_kind
    if kind is None:
        formats = {s.format for s in [*config.data.train, *config.data.eval]}
        kind = next((k for k in ROW_KINDS if k != "sft" and k in formats), "sft")  # a kind's format has its name
    if kind not in ROW_KINDS:
        from lorafit.errors import LorafitError

        raise LorafitError(f"objective: rows of kind {kind!r} are not known",
                           fix=f"a plugin objective's `data` attribute is one of: {', '.join(ROW_KINDS)}")
    return kind


def prepare(config, tokenizer, *, kind: str | None = None, use_cache: bool = True,
            enforce_audit: bool = True) -> PreparedData:
    """Both splits of ``config``'s data as the rows its objective trains on: read, checked, tokenised (cached),
    split, mixed and audited. ``enforce_audit=False`` (inspect, plan, doctor) reports the audit instead of raising."""
    kind = kind or row_kind(config)
    data, seed = config.data, config.train.seed
    if kind == "sft":
        from lorafit.data.supervised import prepare_data

        return prepare_data(data, tokenizer, seed=seed, batch_size=config.train.batch_size,
                            group_by_length=config.train.group_by_length, use_cache=use_cache,
                            enforce_audit=enforce_audit)
    if kind == "preference":
        from lorafit.data.pairs import prepare_preference

        return prepare_preference(data, tokenizer, seed=seed, enforce_audit=enforce_audit, use_cache=use_cache)
    if kind == "triplets":
        from lorafit.data.triplets import prepare_triplets

        return prepare_triplets(data, tokenizer, seed=seed, marker_field=config.eval.attack.marker_field,
                                enforce_audit=enforce_audit, use_cache=use_cache)
    if kind == "unpaired":
        from lorafit.data.unpaired import prepare_unpaired

        return prepare_unpaired(data, tokenizer, seed=seed, enforce_audit=enforce_audit, use_cache=use_cache)
    from lorafit.data.prompts import data_limit, prepare_prompts

    return prepare_prompts(data, tokenizer, seed=seed, max_prompt_length=data_limit(config),
                           enforce_audit=enforce_audit)  # not cached: see data/cache.py


def forward_rows(examples, kind: str) -> list[tuple[int, ...]]:
    """Per example (``PreparedData.train_examples`` or ``eval_examples``), the token lengths of the rows it puts
    through the model in one forward (one for SFT, KTO and a GRPO prompt; chosen and rejected for a pair; three
    for a triplet)."""
    rows = ROW_KINDS[kind].forward_rows
    return [rows(example) for example in examples]


def _function(where: str):
    module, name = where.split(":")
    return getattr(import_module(module), name)


def inspect(config, tokenizer, *, use_cache: bool = True) -> dict:
    """`lorafit data inspect`'s report for the config's kind of rows (``report["kind"]`` names it)."""
    kind = row_kind(config)
    return {"kind": kind, **_function(ROW_KINDS[kind].inspect)(config, tokenizer, use_cache=use_cache)}


def render(report: dict, *, colour: bool) -> str:
    return _function(ROW_KINDS[report["kind"]].render)(report, colour=colour)
