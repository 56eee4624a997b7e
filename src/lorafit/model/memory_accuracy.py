"""How accurate the memory planner is, in one place: what was measured on a GPU on held-out cases, when, with which
command, and which parts of a plan were not. ``lorafit plan`` prints it; docs/planner.md shows the same table.

A GPU session runs ``COMMAND``; its last line is the ``MEASURED`` dict to paste here (and its Markdown table goes to
docs/planner.md). Nothing in model/memory_terms.py is fitted to these numbers: a case measured here stays
held-out as long as no constant is changed to match it (change one, and the cases it was changed for become
in-sample: move them to ``IN_SAMPLE``).
"""

from __future__ import annotations

COMMAND = "python benchmarks/planner_check.py /tmp/planner_check --deadline 540"

# The held-out measurement: {"date", "device", "versions", "cases": {case name: (error percent, [features])}}.
# None until a GPU session runs COMMAND on this planner.
MEASURED: dict | None = None

# The one earlier H200 run (2026-11-26, benchmarks/planner_check.py of then; batches as one packed row): two
# constants were fitted on it (logits at 10 bytes per entry, packed rows without a mask), so its errors were
# in-sample. Both constants are gone: the logits term is derived (12 bytes) and packed rows are masked, as
# transformers builds them. Kept for the record, not as accuracy.
IN_SAMPLE = {"date": "2026-11-26", "device": "H200",
             "cases": {"3b bf16": -0.4, "3b checkpointing": -0.5, "3b qlora nf4": 3.3, "3b liger dropout": -0.9,
                       "7b width 8 layers, 6 GB plan": 2.8}}

# What a plan can depend on, each named as the held-out cases of planner_check.py tag it.
FEATURES = {
    "padded": "padded rows (sdpa with a padding mask, GQA expanded)",
    "packed": "packed rows per bin (sdpa with a block-diagonal mask, GQA expanded)",
    "unmasked": "unmasked attention (flash kernels, or rows of one length)",
    "eager": "eager attention (probabilities kept)",
    "qlora": "a 4-bit or 8-bit base",
    "checkpointing": "gradient checkpointing",
    "liger": "liger's fused kernels",
    "optimizer8": "8-bit paged AdamW",
    "preference": "preference pairs (two rows per pair)",
    "reference": "the no-grad reference forward (DPO, KTO)",
    "contrastive": "contrastive triplets (three rows, hidden states)",
    "dora": "DoRA",
    "evaluation": "the evaluation batch (no-grad forward)",
    "sharded": "several devices (DDP, ZeRO, FSDP)",
}


def features(setup) -> list[str]:
    """The FEATURES a plan for ``setup`` (memory_terms.Setup) depends on."""
    found = []
    if setup.attention == "eager":
        found.append("eager")
    elif setup.attention == "sdpa" and setup.masked:
        found.append("packed" if setup.packed else "padded")
    else:
        found.append("unmasked")
    flags = {"qlora": setup.quant_bits is not None, "checkpointing": setup.checkpointing, "liger": setup.liger,
             "optimizer8": setup.optimizer == "paged_adamw_8bit",
             "preference": setup.objective in ("preference", "kto"), "reference": setup.reference,
             "contrastive": setup.objective == "contrastive", "dora": setup.dora, "evaluation": bool(setup.eval_rows),
             "sharded": setup.nproc > 1}
    return found + [name for name, on in flags.items() if on]


def accuracy(setup) -> dict:
    """The held-out error band of the GPU measurement (None: not measured) and the features of this plan that no
    held-out case measured on a GPU."""
    cases = (MEASURED or {}).get("cases", {})
    errors = [error for error, _ in cases.values()]
    measured = {feature for _, tags in cases.values() for feature in tags}
    return {
        "held_out_band_percent": [min(errors), max(errors)] if errors else None,
        "measured": (f"{len(errors)} held-out cases on {MEASURED['device']}, {MEASURED['date']}" if errors
                     else "not yet measured on a GPU"),
        "not_measured": [FEATURES[f] for f in features(setup) if f not in measured],
        "command": COMMAND,
    }


def accuracy_lines(report: dict) -> list[str]:
    """What `lorafit plan` prints about its accuracy (report: ``accuracy``'s dict)."""
    band = report["held_out_band_percent"]
    if band is None:
        lines = [f"accuracy: not yet measured on a GPU on held-out cases (the command: {report['command']})"]
    else:
        lines = [f"accuracy: {band[0]:+.1f}% to {band[1]:+.1f}% on {report['measured']}"]
    if report["not_measured"]:
        lines.append("not yet measured on a GPU: " + "; ".join(report["not_measured"]))
    return lines
