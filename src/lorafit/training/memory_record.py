"""The memory planner's prediction recorded with the run, next to the peak the run measured, so that every run
checks the planner (`lorafit plan`, docs/planner.md) and its report shows both."""

from __future__ import annotations

from lorafit.config import Config


def predict_for_run(config: Config, train_examples, say) -> dict:
    """The planner's prediction for this run, made as it starts from the examples it will train on, and said."""
    import torch

    from lorafit.model.memory_plan import plan_config

    lengths = [len(e.input_ids) for e in train_examples if hasattr(e, "input_ids")] or [config.data.max_seq_length]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        _, plan = plan_config(config, lengths=lengths, device=device)
    except Exception as exc:  # noqa: BLE001  a planner gap (an unusual architecture) must never stop a training run
        return {"predicted_peak_gib": None, "why": f"the planner could not model this run: {type(exc).__name__}: {exc}"}
    say(f"memory plan: predicted peak {plan.peak / 2**30:.2f} GiB on the {device} (lorafit plan)")
    return {"predicted_peak_gib": plan.as_dict()["peak_gib"], "terms_gib": plan.as_dict()["terms_gib"], "device": device}


def memory_summary(prediction: dict, metrics: dict) -> dict:
    """Predicted vs measured peak (torch.cuda.max_memory_allocated over the whole run, evaluation included)."""
    measured_mb = metrics.get("gpu_allocated_peak_mb")
    summary = dict(prediction)
    if measured_mb is None:
        summary.update(measured_peak_gib=None, measured="not measured (no GPU: the CPU's peak is the process RSS)")
        return summary
    measured = round(measured_mb / 1024, 3)
    summary.update(measured_peak_gib=measured, measured="torch.cuda.max_memory_allocated")
    if prediction.get("predicted_peak_gib") and measured:
        summary["error_percent"] = round(100 * (prediction["predicted_peak_gib"] / measured - 1), 1)
    return summary
