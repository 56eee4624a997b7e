"""What the preference objectives (``objective.type: dpo | orpo``) may be set to, which metrics they log, and
which data and options they cannot train with. Read by config/objective.py; the losses are in
lorafit/training/preference.py, the rows in lorafit/data/preference.py (docs/objectives.md).
"""

from __future__ import annotations

PREFERENCE_OBJECTIVES = ("dpo", "orpo")
# Only the preference objectives read these (loss_type: dpo only); set with another objective they are a mistake.
PREFERENCE_KEYS = ("beta", "loss_type")
# DPO losses (TRL's names and equations): sigmoid = DPO, ipo = IPO (length-normalised), hinge = SLiC.
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
# Logged by both (training: the name; evaluation: eval_<name>); ORPO adds its two terms.
REWARD_METRICS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")
ORPO_METRICS = ("nll_loss", "log_odds_ratio")
PREFERENCE_METRICS = (*REWARD_METRICS, *ORPO_METRICS)


def preference_clashes(objective, data, best_metric: str) -> list[str]:
    """A preference objective and data (a DataConfig) or a best metric that do not go together, or preference
    data under another objective."""
    problems = []
    formats = {s.format for s in [*data.train, *data.eval]}
    metric = best_metric.removeprefix("eval_")
    if objective.type in PREFERENCE_OBJECTIVES:
        if data.packing != "none":
            # Refused rather than ignored: a packed row would hold several pairs, and the loss needs each answer's
            # log-probability on its own row, next to its pair.
            problems.append(f"objective.type: {objective.type} with data.packing: {data.packing}: a preference pair "
                            "is two rows (chosen, rejected) scored one by one; set data.packing: none")
        if formats - {"auto", "preference"}:
            problems.append(f"objective.type: {objective.type} reads preference rows (prompt/chosen/rejected), but a "
                            f"data source has format {sorted(formats - {'auto', 'preference'})[0]!r}; use format: "
                            "preference (or auto)")
        if objective.type == "dpo" and metric in ORPO_METRICS:
            problems.append(f"eval.best.metric: {best_metric!r} is logged only by objective.type: orpo")
    elif objective.type in ("sft", "contrastive"):  # a plugin objective may train on pairs (its data = "preference")
        if "preference" in formats:
            problems.append(f"data: a source has format: preference, which only objective.type: dpo or orpo trains "
                            f"on (or a plugin objective with data = 'preference'); objective.type is "
                            f"{objective.type!r}")
        if metric in PREFERENCE_METRICS:
            problems.append(f"eval.best.metric: {best_metric!r} is logged only by objective.type: dpo or orpo")
    return problems
