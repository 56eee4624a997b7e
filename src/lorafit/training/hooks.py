"""Everything lorafit changes about a training step, in one module: ``LorafitTrainer``, transformers' Trainer with
a few hooks overridden. Trainer keeps the loop (schedules, accumulation with token-count loss normalisation,
clipping, logging, evaluation); each override below says why it exists.

    create_optimizer           parameter groups for LoRA+ and train.embedding_learning_rate (optimizer.py)
    training_step              passes each micro-batch loss to the non-finite guard (no device sync per batch)
    get_batch_samples,         with an objective other than SFT (objective_step.py): count the step's tokens and
    compute_loss, log,         examples before its first micro-batch, compute the objective's loss, and add its
    evaluation_loop            metrics to the training logs and the evaluation metrics; with several SFT sources,
                               the loss of each source (source_loss.py) from the logits, logged as loss/<source>
    evaluate                   runs with every RNG saved and restored: evaluating must not change training
    _get_train_sampler         records (and on resume replays) the length-grouped sampler's order
    _save_checkpoint           writes lorafit's crash-safe, pickle-free checkpoint instead of Trainer's
    _load_from_checkpoint,     read that checkpoint back when Trainer resumes; _load_rng_state also restores
    _load_optimizer_and_scheduler, _load_scaler, _load_rng_state      the loss accumulators at the right moment

These are private Trainer methods and attributes. ``check_trainer_api`` verifies, at the start of every run, that
the installed transformers still has each one with the parameters these overrides expect, and fails with a clear
error otherwise: a silent mismatch would mean checkpoints that do not resume exactly. Checked against
transformers 5.23.x (trainer_api.py: TESTED_TRANSFORMERS, TRAINER_METHODS).
"""

from __future__ import annotations

import dataclasses
import json
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from lorafit.training import checkpoint as ckpt
from lorafit.training import distributed
from lorafit.training.guards import NonFiniteGuard
from lorafit.training.objective_step import ObjectiveRunner
from lorafit.training.objectives import SupervisedObjective
from lorafit.training.optimizer import LearningRates, grouped_optimizer
from lorafit.training.source_loss import SourceLosses, split_source_ids

@contextmanager
def preserved_rng():
    """Run the block, then put every random number generator back where it was.

    Every DataLoader iteration draws its base seed from the global torch RNG, and evaluation iterates the eval
    loader: without this, the next epoch's shuffle and adapter dropout would differ from a run without evaluation.
    Code that generates samples during training uses it the same way.
    """
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@dataclass
class CheckpointSettings:
    root: Path
    save_every: int | None
    keep_last: int
    keep_best: int
    best_metric: str
    best_mode: str
    steps_per_epoch: int
    identity: dict  # config, config hash, fingerprints: what a resume is checked against
    forced_resumes: list = field(default_factory=list)


class ReplayableSampler(torch.utils.data.Sampler):
    """Wraps a sampler that draws its order from the global torch RNG when an epoch starts (LengthGroupedSampler):
    records each epoch's order for the checkpoint, and replays a saved order for the epoch a resume lands in.

    Trainer restores the RNG state only after the resumed epoch's first batch is drawn (so that skipped batches do
    not consume it), so a resumed run would otherwise draw a different order for that epoch.
    """

    def __init__(self, inner, replay: tuple[int, list[int]] | None = None):
        self.inner = inner
        self.epoch = 0
        self.indices: list[int] | None = None
        self._replay = replay

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        if self._replay is not None and self._replay[0] == self.epoch:
            self.indices = list(self._replay[1])
            self._replay = None
        else:
            # Under DDP every process draws the order from its own global RNG, which adapter dropout has moved by
            # different amounts (each process's batches have other shapes): the main process's order is used by
            # all, so that the processes split one order instead of taking overlapping shares of different ones.
            self.indices = distributed.broadcast_from_main(list(iter(self.inner)))
        return iter(self.indices)


class LorafitTrainer(Trainer):
    def __init__(self, *args, settings: CheckpointSettings, guard: NonFiniteGuard, history, stateful=(),
                 objective: ObjectiveRunner | None = None, rates: LearningRates | None = None,
                 source_losses: SourceLosses | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rates = rates
        self.source_losses = source_losses
        self.objective = objective or ObjectiveRunner(SupervisedObjective())
        if self.objective.active:
            self.loss_is_scaled_for_ga = True  # the objective divides by the whole step's counts itself
        self.settings = settings
        self.guard = guard
        self.history = history
        self.stateful = [cb for cb in stateful if hasattr(cb, "state_dict") and hasattr(cb, "load_state_dict")]
        self.last_checkpoint: Path | None = None
        self._saved_step: int | None = None
        self._sampler: ReplayableSampler | None = None
        self._resume_state: dict | None = None
        self._resume_path: Path | None = None

    # -- optimizer: LoRA+ and train.embedding_learning_rate need parameter groups Trainer does not make
    def create_optimizer(self, model=None):
        if self.optimizer is None and self.rates is not None:
            self.optimizer = grouped_optimizer(self, self.model if model is None else model, self.rates)
        return super().create_optimizer(model)  # keeps an optimizer already set

    # -- evaluation: consumes no randomness training would see (Trainer's periodic and at-start evaluations too)
    def evaluate(self, *args, **kwargs):
        with preserved_rng():
            return super().evaluate(*args, **kwargs)

    # -- data order
    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            replay = None
            position = (self._resume_state or {}).get("sampler")
            if position and position.get("indices") is not None:
                replay = (position["epoch"], position["indices"].tolist())
            sampler = self._sampler = ReplayableSampler(sampler, replay)
        # RandomSampler is replaced by accelerate's SeedableRandomSampler (order = f(data_seed, epoch)): nothing to keep
        return sampler

    # -- guard
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.guard.observe_loss(loss)
        return loss

    # -- objective (SFT keeps Trainer's own loss, which is the same next-token loss)
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.objective.active:
            self.objective.start_step(self, batch_samples)
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs, source_ids = split_source_ids(inputs)  # the collator's per-token sources are not a model input
        if not self.objective.active and source_ids is not None and self.source_losses is not None and model.training:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            self.source_losses.observe(outputs.get("logits"), inputs["labels"], source_ids)
            return (loss, outputs) if return_outputs else loss
        if not self.objective.active:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self.objective.loss(self, model, inputs)
        return (loss, {"loss": loss}) if return_outputs else loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        self.objective.add_to_eval(output.metrics, metric_key_prefix)
        return output

    def log(self, logs, *args, **kwargs):
        self.objective.add_to_logs(logs)
        if self.source_losses is not None and "loss" in logs and not any(key.startswith("eval_") for key in logs):
            logs.update(self.source_losses.pop(self.accelerator))  # every process logs at the same steps
        super().log(logs, *args, **kwargs)

    # -- saving
    def _save_checkpoint(self, model, trial) -> None:
        step = self.state.global_step
        if self._saved_step == step:
            return  # an epoch end right after a step's save is the same state
        # Trainer calls this on every process; what gathers across processes runs on all of them, before the main
        # process alone decides to write (a collective one process skips would hang the others).
        self.store_flos()
        shared = distributed.checkpoint_state(self)
        self._saved_step = step  # on every process: a second request at this step must skip the gathers everywhere
        if self.guard.tripped or self.guard.consecutive:
            return  # only the state after a good step is saved
        # The adapter is the same on every process, so each takes the same decision to stop.
        if not self.guard.weights_finite(safetensors_bytes(shared["adapter"]), step):
            self.control.should_training_stop = True
            return
        if not self.args.should_save:
            return  # only the main process writes
        files = self._checkpoint_files(step, shared)
        s = self.settings
        self.last_checkpoint = ckpt.commit_checkpoint(
            s.root, step, files, keep_last=s.keep_last, keep_best=s.keep_best, best_mode=s.best_mode
        )

    def _checkpoint_files(self, step: int, shared: dict) -> dict[str, bytes]:
        adapter = shared["adapter"]
        peft_config = self.model.peft_config["default"].to_dict()
        peft_config = {k: sorted(v) if isinstance(v, set) else v for k, v in peft_config.items()}

        scaler = getattr(self.accelerator, "scaler", None)
        sampler = self._sampler
        tensors: dict[str, torch.Tensor] = {}
        tree = {
            "optimizer": shared["optimizer"],
            "scheduler": self.lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": ckpt.capture_rng(),
            "sampler": {
                "epoch": sampler.epoch if sampler else None,
                "indices": torch.tensor(sampler.indices, dtype=torch.int64) if sampler and sampler.indices else None,
            },
            "loop": {
                "tr_loss": self._tr_loss,
                "total_loss_scalar": self._total_loss_scalar,
                "globalstep_last_logged": self._globalstep_last_logged,
                "history": self.history.counters(),
            },
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in [self.guard, *self.stateful]},
            "ranks": shared["ranks"],  # each process's RNG and loss accumulator (None with one process)
        }
        state_json = ckpt.flatten_state(tree, "state", tensors)

        records = self.history.snapshot()
        metric = self.settings.best_metric
        score = next((r[metric] for r in reversed(records) if r["step"] == step and metric in r), None)
        steps_per_epoch = self.settings.steps_per_epoch
        meta = {
            "format": ckpt.FORMAT_VERSION,
            "step": step,
            "epoch": self.state.epoch,
            "position": {  # checkpoints are taken at optimizer-step boundaries: micro_step is always 0
                "epoch_index": step // steps_per_epoch,
                "steps_into_epoch": step % steps_per_epoch,
                "micro_batches_into_epoch": (step % steps_per_epoch) * self.args.gradient_accumulation_steps,
                "micro_step": 0,
                "sampler_epoch": tree["sampler"]["epoch"],
            },
            "max_steps": self.state.max_steps,
            "world_size": distributed.world_size(),
            "strategy": shared["strategy"],
            "versions": _versions(),
            "best_metric": metric,
            "best_metric_value": score,
            **self.settings.identity,
            "forced_resumes": self.settings.forced_resumes,
        }
        return {
            ckpt.ADAPTER: safetensors_bytes(adapter, metadata={"format": "pt"}),
            "adapter_config.json": (json.dumps(peft_config, indent=2) + "\n").encode(),
            ckpt.STATE_TENSORS: safetensors_bytes(tensors),
            ckpt.STATE_JSON: (json.dumps(state_json) + "\n").encode(),
            ckpt.TRAINER_STATE: (json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n").encode(),
            ckpt.HISTORY: "".join(json.dumps(r) + "\n" for r in records).encode(),
            ckpt.META: (json.dumps(meta, indent=2) + "\n").encode(),
        }

    # -- resuming: Trainer calls these with the checkpoint folder
    def prepare_resume(self, folder: Path) -> None:
        """Read a verified checkpoint's training state before ``train(resume_from_checkpoint=folder)``."""
        tensors = load_file(folder / ckpt.STATE_TENSORS)
        tree = json.loads((folder / ckpt.STATE_JSON).read_text(encoding="utf-8"))
        self._resume_state = ckpt.unflatten_state(tree, tensors)
        self._resume_path = folder
        self._saved_step = ckpt.read_meta(folder)["step"]  # already on disk
        callbacks = self._resume_state["callbacks"]
        for cb in [self.guard, *self.stateful]:
            if type(cb).__name__ in callbacks:
                cb.load_state_dict(callbacks[type(cb).__name__])

    def resumed_history_counters(self) -> dict:
        """MetricsHistory's running totals at the checkpoint (throughput and token counts cover the whole run)."""
        return self._resume_state["loop"]["history"]

    def checkpoint_is_final(self, folder: Path) -> bool:
        meta = ckpt.read_meta(folder)
        return meta["step"] >= meta["max_steps"]

    def restore_final(self, folder: Path) -> None:
        """Load the state of a checkpoint taken at the last step. Trainer's resume would train one more step when
        max_steps ends mid-epoch, so the adapter and state are loaded directly instead."""
        from transformers import TrainerState

        self._load_from_checkpoint(str(folder))
        self.state = TrainerState.load_from_json(str(folder / ckpt.TRAINER_STATE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        from peft import set_peft_model_state_dict

        model = model if model is not None else self.model
        weights = load_file(Path(resume_from_checkpoint) / ckpt.ADAPTER)
        result = set_peft_model_state_dict(model, weights)
        if result.unexpected_keys:
            raise RuntimeError(f"checkpoint adapter has tensors the model lacks: {result.unexpected_keys[:5]}")

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if checkpoint is None:
            return
        distributed.load_optimizer_state(self, self._resume_state["optimizer"])
        self.lr_scheduler.load_state_dict(self._resume_state["scheduler"])

    def _load_scaler(self, checkpoint) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is not None and scaler is not None and self._resume_state["scaler"] is not None:
            scaler.load_state_dict(self._resume_state["scaler"])

    def _load_rng_state(self, checkpoint) -> None:
        # Trainer calls this once, in the resumed epoch, right before the first step it trains (and after it has
        # reset its loss accumulators), which is also the moment to restore them: the next logged loss then
        # averages the same steps as in an uninterrupted run.
        if checkpoint is None:
            return
        loop, mine = self._resume_state["loop"], distributed.own_rank_state(self._resume_state)
        ckpt.restore_rng(mine["rng"])
        self._tr_loss = mine["tr_loss"].to(self.args.device)
        self._total_loss_scalar = loop["total_loss_scalar"]
        self._globalstep_last_logged = loop["globalstep_last_logged"]


def _versions() -> dict:
    import peft
    import transformers

    from lorafit import __version__

    return {"lorafit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}
