"""What the preference objectives (``objective.type: dpo | orpo | simpo | kto``) may be set to, which metrics they
log, and which data and options they cannot train with. Read by config/objective.py; the losses are in
lorafit/training/preference.py and training/kto.py, the rows in lorafit/data/pairs.py (pairs) and
data/unpaired.py (KTO's single answers) (docs/objectives.md).
"""

from __future__ import annotations

# Objectives that read pairs (prompt/chosen/rejected); KTO reads single answers labelled desirable or not.
PREFERENCE_OBJECTIVES = ("dpo", "orpo", "simpo")
UNPAIRED_OBJECTIVES = ("kto",)
# Only these objectives read these keys; set with another objective they are a mistake.
PREFERENCE_KEYS = ("beta", "loss_type", "simpo_gamma", "desirable_weight", "undesirable_weight")
KEYS_OF = {"dpo": {"beta", "loss_type"}, "orpo": {"beta"}, "simpo": {"beta", "simpo_gamma"},
           "kto": {"beta", "desirable_weight", "undesirable_weight"}}
# Objectives TRL trains with dropout off by default (its disable_dropout): the policy and the reference (or the
# generation that produced the answers) must see the same network.
DROPOUT_OFF_OBJECTIVES = ("dpo", "orpo", "simpo", "kto", "grpo")
# DPO losses (TRL's names and equations): sigmoid = DPO, ipo = IPO (length-normalised), hinge = SLiC.
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
# Logged by dpo/orpo/simpo (training: the name; evaluation: eval_<name>); ORPO adds its two terms. KTO logs
# reward_chosen, reward_rejected and kl (its reference point, a name it shares with GRPO's KL penalty).
REWARD_METRICS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")
ORPO_METRICS = ("nll_loss", "log_odds_ratio")
PREFERENCE_METRICS = (*REWARD_METRICS, *ORPO_METRICS)


def preference_clashes(objective, data, best_metric: str) -> list[str]:
    """A preference objective and data (a DataConfig) or a best metric that do not go together, or preference
    data under another objective."""
    problems = []
    formats = {s.format for s in [*data.train, *data.eval]}
    metric = best_metric.removeprefix("eval_")
    kind = "preference" if objective.type in PREFERENCE_OBJECTIVES else "unpaired"
    if objective.type in PREFERENCE_OBJECTIVES + UNPAIRED_OBJECTIVES:
        if data.packing != "none":
            # Refused rather than ignored: a packed row would hold several answers, and the loss needs each answer's
            # log-probability on its own row.
            problems.append(f"objective.type: {objective.type} with data.packing: {data.packing}: each answer is a "
                            "row of its own, scored one by one; set data.packing: none")
        if formats - {"auto", kind}:
            rows = "preference rows (prompt/chosen/rejected)" if kind == "preference" else \
                "unpaired rows (prompt/completion/label)"
            problems.append(f"objective.type: {objective.type} reads {rows}, but a data source has format "
                            f"{sorted(formats - {'auto', kind})[0]!r}; use format: {kind} (or auto)")
        if objective.type != "orpo" and metric in ORPO_METRICS:
            problems.append(f"eval.best.metric: {best_metric!r} is logged only by objective.type: orpo")
    elif objective.type in ("sft", "contrastive", "grpo"):  # a plugin objective may train on pairs
        for fmt, who in (("preference", "dpo, orpo or simpo"), ("unpaired", "kto")):
            if fmt in formats:
                problems.append(f"data: a source has format: {fmt}, which only objective.type: {who} trains on (or a "
                                f"plugin objective with data = '{fmt}'); objective.type is {objective.type!r}")
        if metric in PREFERENCE_METRICS:
            problems.append(f"eval.best.metric: {best_metric!r} is logged only by objective.type: dpo, orpo, simpo "
                            "or kto")
    return problems
