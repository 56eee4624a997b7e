"""The private Trainer API lorafit's hooks (``hooks.py``) rely on, and the start-up check that the installed
transformers still has it: a silent mismatch would mean checkpoints that do not resume exactly."""

from __future__ import annotations

import inspect

from transformers import Trainer

from lorafit.errors import LorafitError

TESTED_TRANSFORMERS = "5.23.x"
# Trainer methods lorafit overrides or calls, with the parameters the overrides rely on (names, in order).
TRAINER_METHODS = {
    "training_step": ("self", "model", "inputs", "num_items_in_batch"),
    "create_optimizer": ("self", "model"),
    "get_decay_parameter_names": ("self", "model"),
    "evaluate": ("self",),
    "_get_train_sampler": ("self", "train_dataset"),
    "_save_checkpoint": ("self", "model", "trial"),
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
    "_load_optimizer_and_scheduler": ("self", "checkpoint"),
    "_load_scaler": ("self", "checkpoint"),
    "_load_rng_state": ("self", "checkpoint"),
    "_inner_training_loop": ("self",),
    "store_flos": ("self",),
    "log": ("self", "logs"),
    "get_batch_samples": ("self", "epoch_iterator", "num_batches", "device"),
    "compute_loss": ("self", "model", "inputs", "return_outputs", "num_items_in_batch"),
    "evaluation_loop": ("self", "dataloader", "description", "prediction_loss_only", "ignore_keys", "metric_key_prefix"),
}
# Loop state lorafit saves and restores (set by Trainer's loop), and the calls whose timing resume relies on.
LOOP_SOURCE = ("self._tr_loss", "self._total_loss_scalar", "self._globalstep_last_logged",
               "self._load_rng_state(", "self._load_optimizer_and_scheduler(", "self._load_scaler(")


def trainer_api_problems(trainer_class=Trainer, methods: dict | None = None, loop_source=LOOP_SOURCE) -> list[str]:
    """What ``trainer_class`` lacks of the private API the overrides below rely on; empty when all is there."""
    problems = []
    for name, expected in (TRAINER_METHODS if methods is None else methods).items():
        method = getattr(trainer_class, name, None)
        if not callable(method):
            problems.append(f"Trainer.{name}: missing")
            continue
        params = tuple(inspect.signature(method).parameters)
        if params[: len(expected)] != expected:
            problems.append(f"Trainer.{name}{tuple(params)}: expected parameters starting with {expected}")
    # The loop is spread over several Trainer methods (and moves between them across versions): its whole module
    # is what must still set and call these.
    try:
        source = inspect.getsource(inspect.getmodule(Trainer))
    except (OSError, TypeError):
        source = ""
    problems += [f"Trainer's training loop no longer uses {needle}" for needle in loop_source if needle not in source]
    return problems


def check_trainer_api(trainer_class=Trainer, methods: dict | None = None) -> None:
    problems = trainer_api_problems(trainer_class, methods)
    if problems:
        import transformers

        raise LorafitError(
            f"transformers {transformers.__version__} is not a version lorafit's training hooks work with",
            details=problems,
            why="lorafit overrides private Trainer methods for exact resume and the NaN guard; "
            f"they were checked against transformers {TESTED_TRANSFORMERS}",
            fix=f"install transformers {TESTED_TRANSFORMERS} (pip install 'transformers>=5.23,<5.24')",
        )
