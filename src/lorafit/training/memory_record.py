"""The memory planner's prediction recorded with the run, next to the peak the run measured, so that every run
checks the planner (`lorafit plan`, docs/planner.md) and its report shows both."""

from __future__ import annotations

from lorafit.config import Config


def predict_for_run(config: Config, prepared, kind: str, say) -> dict:
    """The planner's prediction for this run, made as it starts from the rows it will train on (``prepared``, of
    the data entry's ``kind``) for the machine it runs on, and said."""
    from lorafit.model.attention import Machine
    from lorafit.model.memory_plan import plan_config
    from lorafit.model.memory_rows import rows_of

    machine = Machine.current()
    device = "cuda" if machine.cuda else "cpu"
    try:
        _, plan = plan_config(config, lengths=rows_of(config, prepared, kind), device=device, machine=machine)
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
