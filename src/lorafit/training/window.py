"""What a log line averages, kept on the device between logging steps and read in one transfer.

A training step adds its loss and its objective's metrics here as device tensors; nothing is read back to the host
until a logging step (or an evaluation's end), where every sum of every process is reduced together and read with
one ``.tolist()``. A step that does not log therefore never waits for the device (docs/design.md, "No host read on a
step that does not log").

Metric values are weighted means: an objective returns a batch mean and how many items it is a mean over
(``Objective.metric_weight``), or a (sum, weight) pair; the window keeps sum(value x weight) and sum(weight), so a log
line's value is exactly the mean over every item of the window, on every process. The per-source training loss
(``loss/<source>``) is a (summed token loss, token count) pair per source.
"""

from __future__ import annotations

import torch


class MetricSums:
    """Named (weighted sum, weight) pairs, on the device until ``read``."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor | float] = {}
        self.weights: dict[str, torch.Tensor | float] = {}

    def add(self, name: str, total, weight) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + _detached(total)
        self.weights[name] = self.weights.get(name, 0.0) + _detached(weight)

    def add_means(self, metrics: dict, weight_of) -> None:
        """``metrics``: name -> batch mean (tensor or float) or (sum, weight); ``weight_of(name)``: the mean's weight."""
        for name, value in metrics.items():
            if isinstance(value, tuple):
                self.add(name, *value)
            else:
                weight = _detached(weight_of(name))
                self.add(name, _detached(value) * weight, weight)

    def __bool__(self) -> bool:
        return bool(self.sums)

    def names(self) -> list[str]:
        return list(self.sums)

    def read(self, reduce=None, device=None, extra: list[torch.Tensor] = (),
             summed: torch.Tensor | None = None) -> tuple[dict[str, float], list[float]]:
        """The means, reduced over processes by ``reduce`` (a function on one float64 tensor on ``device``), then
        the ``summed`` values (reduced with them) and the values of the ``extra`` tensors (not reduced), in ONE
        device-to-host transfer; empties the sums. Names whose weight is 0 are left out."""
        names = list(self.sums)
        if device is None:
            found = [v for v in [*self.sums.values(), *self.weights.values(), *extra] if torch.is_tensor(v)]
            device = found[0].device if found else "cpu"
        parts = [torch.as_tensor(part, dtype=torch.float64, device=device).reshape(1)
                 for name in names for part in (self.sums[name], self.weights[name])]
        if summed is not None:
            parts.append(summed.detach().reshape(-1).to(device, torch.float64))
        stacked = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
        if reduce is not None and len(stacked):
            stacked = reduce(stacked)
        tail = [t.detach().reshape(-1).to(device, torch.float64) for t in extra]
        values = torch.cat([stacked, *tail]).tolist()  # the one host read
        self.sums, self.weights = {}, {}
        means = {name: values[2 * i] / values[2 * i + 1] for i, name in enumerate(names) if values[2 * i + 1]}
        return means, values[2 * len(names):]

    def state_dict(self) -> dict:
        """Plain values for a checkpoint (read now: a checkpoint is written on the host anyway)."""
        return {"sums": {k: _plain(v) for k, v in self.sums.items()},
                "weights": {k: _plain(v) for k, v in self.weights.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.weights = dict(state["sums"]), dict(state["weights"])


def _detached(value):
    """A tensor detached and widened to float64 (sums over a long window stay exact enough; MPS has no float64)."""
    if not torch.is_tensor(value):
        return value
    return value.detach().to(torch.float32 if value.device.type == "mps" else torch.float64)


def _plain(value) -> float:
    return float(value)  # checkpoint time: the only host read of a partial window


class LogWindow:
    """The training values since the last log line: the summed step losses and the objective's metrics, and every
    step's loss and gradient norm (``trace``, for the run's health check: a run that diverges between two log lines
    is seen, training/health.py).

    Each process adds its share of every step's loss (the step's loss is the sum of the shares over processes, as
    each share is divided by the step's totals over all of them); ``read`` sums over processes and divides by the
    number of steps, which every process counts alike."""

    def __init__(self, processes: int = 1):
        self.processes = processes
        self.loss_sum: torch.Tensor | float = 0.0
        self.steps = 0
        self.metrics = MetricSums()
        self.pending: list = []  # (loss share, gradient norm) of each step since the last read, on the device
        self.trace: list[list[float]] = []  # [step loss, gradient norm] of every step read so far, on the host

    def add_step(self, loss: torch.Tensor, grad_norm: torch.Tensor | None = None) -> None:
        dtype = torch.float32 if loss.device.type == "mps" else torch.float64  # MPS has no float64
        self.loss_sum = self.loss_sum + loss.detach().to(dtype)
        self.steps += 1
        norm = grad_norm.detach().to(dtype) if grad_norm is not None else torch.full((), float("nan"), dtype=dtype,
                                                                                     device=loss.device)
        self.pending.append((loss.detach().to(dtype), norm))

    def read(self, reduce=None, device=None, extra: list[torch.Tensor] = ()) -> tuple[dict[str, float], list[float]]:
        """``loss`` (the mean step loss of the window), the metrics' means and the ``extra`` values, in one
        transfer (``MetricSums.read``); empties the window and adds its steps to ``trace``."""
        if self.steps:
            # weight steps / processes on each: reduced, the sum of shares over exactly `steps` steps
            self.metrics.add("loss", self.loss_sum, self.steps / self.processes)
        k = len(self.pending)
        losses = torch.stack([torch.as_tensor(loss) for loss, _ in self.pending]) if k else None
        norms = [torch.stack([torch.as_tensor(norm) for _, norm in self.pending])] if k else []
        values, rest = self.metrics.read(reduce, device, [*norms, *extra], summed=losses)
        step_losses, rest = rest[:k], rest[k:]  # each step's loss, summed over the processes' shares
        step_norms, rest = rest[:k], rest[k:]  # the norm of the all-reduced gradient: the same on every process
        self.trace += [[loss, norm] for loss, norm in zip(step_losses, step_norms)]
        self.loss_sum, self.steps, self.pending = 0.0, 0, []
        return values, rest

    def state_dict(self) -> dict:
        return {"loss_sum": _plain(self.loss_sum), "steps": self.steps, "metrics": self.metrics.state_dict(),
                "pending": [[_plain(loss), _plain(norm)] for loss, norm in self.pending], "trace": self.trace}

    def load_state_dict(self, state: dict) -> None:
        self.loss_sum, self.steps = state["loss_sum"], state["steps"]
        self.metrics.load_state_dict(state["metrics"])
        self.pending = [(torch.tensor(loss, dtype=torch.float64), torch.tensor(norm, dtype=torch.float64))
                        for loss, norm in state.get("pending", [])]
        self.trace = [list(pair) for pair in state.get("trace", [])]
