"""Did the run learn at all? ``assess_health`` reads the logged losses and gradient norms for a diverged run (NaN,
a loss at chance after it was below, a vanished gradient) and ``diverged_advice`` says what to change; a diverged
run exits with ``DIVERGED_EXIT_CODE``."""

from __future__ import annotations

import math

# A gradient norm below this over the last logged steps means nothing is being learned any more.
VANISHED_GRAD_NORM = 1e-6
# How close (relative) a loss must be to ln(vocab_size), the loss of a uniform guess, to count as "at chance". A
# collapse lands on it to 4 decimals; a random base starts within ~0.1%; a trained tiny model starts 1% above it.
UNIFORM_TOLERANCE = 0.001
DIVERGED_EXIT_CODE = 3


def assess_health(records: list[dict], vocab_size: int | None, *, trace: list | None = None,
                  window: int = 3, zero_gradients_expected: bool = False) -> dict:
    """Did the run learn, or did it diverge or collapse? A too-high learning rate can drive a model to predict
    the uniform distribution (loss = ln(vocab_size)) with zero gradients: finite values, no NaN guard trips, and
    the run would look like a success.

    ``trace``: every step's [loss, gradient norm] (the loop's ``LogWindow.trace``), so a collapse between two log
    lines counts; without it the logged records are used. Diverged when the gradient norm stayed below
    ``VANISHED_GRAD_NORM`` over the last ``window`` steps, or when the losses moved TO the uniform guess: the final
    train loss (and the final eval loss, where there is one) sits at ln(vocab_size) while the start (the first
    evaluation, else the first step's loss) did not. A run that starts at the uniform guess (a random base) and
    has not moved yet is not called diverged: it is compared with its start. ``zero_gradients_expected``: GRPO,
    whose step has exactly zero gradient when every answer of every group got the same reward (no advantage), so
    vanished gradients say nothing there.

    >>> trace = [[7.03, 3.3], [6.9315, 0.0], [6.9315, 0.0], [6.9315, 0.0]]
    >>> assess_health([], 1024, trace=trace)["status"], assess_health([], 1024, trace=trace[:1] + [[5.3, 0.7]])["status"]
    ('diverged', 'ok')
    """
    steps = [pair for pair in (trace or []) if len(pair) == 2]
    if steps:
        losses, norms = [p[0] for p in steps], [p[1] for p in steps]
    else:
        losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
        norms = [r["grad_norm"] for r in records if isinstance(r.get("grad_norm"), (int, float))]
    evals = [r["eval_loss"] for r in records if isinstance(r.get("eval_loss"), (int, float))]
    uniform = math.log(vocab_size) if vocab_size else None

    def at_uniform(value) -> bool:
        return bool(uniform and value is not None and math.isfinite(value)
                    and abs(value - uniform) <= UNIFORM_TOLERANCE * uniform)

    last = norms[-window:]
    start = evals[0] if len(evals) >= 2 else (losses[0] if losses else None)
    ends = [losses[-1]] if losses else []
    if len(evals) >= 2:
        ends.append(evals[-1])
    signals = {
        "loss_not_improved": len(losses) >= 2 and losses[-1] >= losses[0],
        "gradients_vanished": not zero_gradients_expected and len(norms) >= 2 and all(math.isfinite(n) and n < VANISHED_GRAD_NORM for n in last),
        "loss_at_uniform": bool(ends) and all(at_uniform(v) for v in ends),
        "started_at_uniform": at_uniform(start),
    }
    reasons = []
    if signals["gradients_vanished"]:
        reasons.append(f"gradient norm below {VANISHED_GRAD_NORM:g} over the last {len(last)} steps")
    if signals["loss_at_uniform"] and not signals["started_at_uniform"] and len(losses) >= 2:
        reasons.append(f"the loss went from {start:.4f} to {ends[-1]:.4f}, ln(vocab_size) = {uniform:.4f}: the "
                       "loss of a uniform guess")
    return {"status": "diverged" if reasons else "ok", "reasons": reasons, "signals": signals,
            "uniform_loss": uniform, "train_loss_first": losses[0] if losses else None,
            "train_loss_final": losses[-1] if losses else None, "grad_norm_last": last, "steps_checked": len(norms)}


def diverged_advice(health: dict) -> str:
    return ("training diverged: " + "; ".join(health["reasons"])
            + ". Lower train.learning_rate (10x), set train.max_grad_norm, or add warmup, then train again")
