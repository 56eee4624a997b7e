"""What the Trainer hooks need to train with an ``Objective`` (lorafit.training.objectives): the totals of each
optimizer step, the loss of each micro-batch, and the objective's metrics averaged for the logs.

``LorafitTrainer`` (hooks.py) calls these from its overrides; they are kept here so the hooks stay one line each.
The default SFT objective is not routed through here: Trainer's own ``compute_loss`` already is that loss
(including its multi-process scaling), so an SFT run is unchanged.
"""

from __future__ import annotations

import torch

from lorafit.data.labels import IGNORE_INDEX
from lorafit.training.objectives import Objective, StepTotals, SupervisedObjective


class MetricMeans:
    """Example-weighted running means of metric dicts (between two training logs, or over one evaluation)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, metrics: dict[str, float], weight) -> None:
        """``weight``: a number, or a function name -> number (what each metric's batch mean is over)."""
        for name, value in metrics.items():
            w = weight(name) if callable(weight) else weight
            self.sums[name] = self.sums.get(name, 0.0) + float(value) * w
            self.weights[name] = self.weights.get(name, 0.0) + w

    def pop(self, prefix: str = "") -> dict[str, float]:
        means = {f"{prefix}{name}": self.sums[name] / self.weights[name] for name in self.sums if self.weights[name]}
        self.sums, self.weights = {}, {}
        return means

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "weights": dict(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.weights = dict(state["sums"]), dict(state["weights"])


class ObjectiveRunner:
    """One objective inside Trainer's loop. ``active`` is False for plain SFT (Trainer computes that loss itself)."""

    def __init__(self, objective: Objective):
        self.objective = objective
        self.active = type(objective) is not SupervisedObjective
        self.totals: StepTotals | None = None
        self.train_metrics, self.eval_metrics = MetricMeans(), MetricMeans()
        self.names: set[str] = set(objective.metric_names)  # every metric name seen: what the history keeps

    def start_step(self, trainer, batch_samples: list[dict]) -> None:
        """Called with every micro-batch of an optimizer step before the first one trains (get_batch_samples).

        The counts are taken here rather than from Trainer's ``num_items_in_batch``, which Trainer leaves out
        for models whose forward takes no loss kwargs. With several processes they are summed over all of them
        and each loss is multiplied by the process count, as Trainer does for tokens (DDP averages gradients)."""
        tokens = sum(int((b["labels"][..., 1:] != IGNORE_INDEX).sum()) for b in batch_samples if "labels" in b)
        examples = sum(self.objective.examples_in(b) for b in batch_samples)
        history = getattr(trainer, "history", None)
        if history is not None and hasattr(history, "add_supervised"):
            history.add_supervised(tokens)  # this process's tokens, for supervised tokens/s
        if self._across_processes(trainer):
            counts = trainer.accelerator.gather(torch.tensor([tokens, examples], device=trainer.args.device).unsqueeze(0))
            tokens, examples = (int(v) for v in counts.sum(0))
        self.totals = StepTotals(tokens=tokens, examples=examples)

    @staticmethod
    def _across_processes(trainer) -> bool:
        return trainer.args.average_tokens_across_devices and trainer.args.world_size > 1

    def loss(self, trainer, model, inputs: dict) -> torch.Tensor:
        """The micro-batch's loss: normalised by the step's totals in training, by its own counts in evaluation."""
        training = model.training
        loss, metrics = self.objective.compute(model, inputs, self.totals if training else None)
        (self.train_metrics if training else self.eval_metrics).add(
            metrics, lambda name: self.objective.metric_weight(name, inputs))
        self.names.update(metrics)
        if training and self._across_processes(trainer):
            loss = loss * trainer.accelerator.num_processes
        return loss

    def add_to_logs(self, logs: dict) -> None:
        """Training logs (they carry "loss") get the metrics' means since the previous log."""
        if "loss" in logs and not any(key.startswith("eval_") for key in logs):
            logs.update(self.train_metrics.pop())

    def add_to_eval(self, metrics: dict, prefix: str) -> None:
        metrics.update(self.eval_metrics.pop(f"{prefix}_"))

    def state_dict(self) -> dict:
        # Metrics summed since the last log, so that a resumed run logs the same means as an uninterrupted one.
        return self.train_metrics.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.train_metrics.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- the recipe's steps


def objective_for(config, user_callbacks) -> tuple[ObjectiveRunner, list]:
    """The run's objective and the callbacks named in ``plugins.callbacks`` (instantiated, after the user's).
    Plugins are imported here, before any data or model is loaded, so a wrong path fails the run at once."""
    from lorafit.training.callbacks import LorafitCallback
    from lorafit.training.objectives import build_objective
    from lorafit.training.plugins import load_plugin

    plugins = config.plugins
    objective = build_objective(config.objective, allow_external_code=plugins.allow_external_code)
    loaded = [load_plugin(spec, base=LorafitCallback, field=f"plugins.callbacks[{i}]", config_dir=plugins.config_dir,
                          allow_external_code=plugins.allow_external_code)()
              for i, spec in enumerate(plugins.callbacks)]
    return ObjectiveRunner(objective), [*user_callbacks, *loaded]


def prepare_run_data(config, tokenizer, runner: ObjectiveRunner, *, use_cache: bool):
    """SFT rows, or triplets or preference pairs when the objective trains on them."""
    from lorafit.data import prepare_data
    from lorafit.data.triplets import prepare_triplets

    if runner.objective.data == "preference":
        from lorafit.data.preference import prepare_preference

        return prepare_preference(config.data, tokenizer, seed=config.train.seed)
    if runner.objective.data == "triplets":
        return prepare_triplets(config.data, tokenizer, seed=config.train.seed,
                                marker_field=config.eval.attack.marker_field)
    return prepare_data(config.data, tokenizer, seed=config.train.seed, batch_size=config.train.batch_size,
                        group_by_length=config.train.group_by_length, use_cache=use_cache)


def attack_comparison(config, model, tokenizer, runner: ObjectiveRunner, eval_examples) -> dict | None:
    """Attack success rate of base and adapter on the injection inputs of the eval triplets (None when off)."""
    attack = config.eval.attack
    if runner.objective.data != "triplets" or not attack.samples or not eval_examples:
        return None
    from lorafit.evaluate.attack import attack_sample, compare_attack_success

    records = attack_sample([e.record for e in eval_examples], attack)
    return compare_attack_success(model, tokenizer, records, attack, max_new_tokens=config.eval.max_new_tokens,
                                  batch_size=config.eval.batch_size or config.train.batch_size)
