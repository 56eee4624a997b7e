"""The training loop: every optimizer step of a run, in one place, on accelerate.

    for each epoch (its batch plan: training/batches.py)
      for each optimizer step (train.grad_accum micro-batches on this process)
        totals  = supervised tokens and examples of the whole step, every process     (host counts, no device read)
        for each micro-batch:
            loss, metrics = objective.compute(model, batch, totals)                   (its share of the step's loss)
            accelerator.backward(loss x processes)                                    (gradients sync on the last)
        norm = clip the gradients (accelerate: DDP / FSDP2 / DeepSpeed aware)
        skip = the guard's device flag: loss or norm not finite on any process
        optimizer.step() (a flagged step changes nothing, on the device) -> scheduler.step() -> zero_grad
        at its boundaries: log (one host read), evaluate, save; then stop? (signal, guard, early stopping)

Supervised fine-tuning is an Objective like DPO, ORPO and the contrastive loss (training/objectives.py): one
interface, one path. accelerate does the device placement, mixed precision, DDP/FSDP2/DeepSpeed wrapping, the
gradient sync and clipping; lorafit does the accumulation with token-count normalisation, the guard, the log/eval/
save schedule, the checkpoints (training/snapshot.py) and exact resume. docs/design.md says why this is not
transformers' Trainer.

No host-device synchronisation on a step that does not log: counts are taken on the host from the CPU batches,
the loss, metrics and guard flags stay on the device (training/window.py, guards.py) and are read together at
logging, evaluation and saving steps.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafit.training import batches as plans
from lorafit.training.callbacks import dispatch, peak_memory
from lorafit.training.strategy import adapter_state, barrier, make_accelerator, strategy_of, sum_on_host
from lorafit.training.objectives import Objective, StepTotals
from lorafit.training.optimizer import build_optimizer, build_scheduler, skips_on_device
from lorafit.training.window import LogWindow


@dataclass
class LoopState:
    """Where the loop is: plain values, saved in every checkpoint (training/snapshot.py)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next step comes from
    step_in_epoch: int = 0  # steps of that epoch done
    tokens_seen: int = 0  # non-padding input tokens, every process
    supervised_seen: int = 0  # supervised (loss) tokens, every process
    train_seconds: float = 0.0  # inside optimizer steps only (evaluation and saving excluded)
    evaluations: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class LoopParts:
    """What the recipe hands the loop besides the model and the data: the run's bookkeeping objects."""

    run: object  # RunFolder
    history: object  # MetricsHistory
    guard: object  # NonFiniteGuard
    best: object  # BestMetric
    stop: object  # StopRequest
    callbacks: list = field(default_factory=list)  # LorafitCallbacks
    progress: object = None  # Progress or None
    trackers: object = None  # Trackers or None
    generation: object = None  # (examples, settings): the eval sample answered every eval.generate_every evaluations
    layout_check: object = None  # a function (model, when) run before every step (4-bit bases)
    checkpoints: object = None  # snapshot.Checkpoints: writes and reads checkpoints


class TrainingLoop:
    def __init__(self, config, model, objective, train_data, eval_data, collate, parts: LoopParts):
        t = config.train
        self.config, self.settings, self.parts = config, t, parts
        self.objective = objective
        self.train_data, self.eval_data = train_data, eval_data
        self.accelerator = make_accelerator(config)
        self.processes, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.is_main_process = self.accelerator.is_main_process
        parts.run.main_process = self.is_main_process  # from here on accelerate's view decides who writes
        self.device = self.accelerator.device
        self.strategy = strategy_of(self.accelerator)
        if t.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        on_cuda = torch.cuda.is_available()
        self.collate = plans.CountingCollator(collate, objective)
        self.workers = t.loader_workers if t.loader_workers is not None else (2 if on_cuda else 0)
        self.pin = on_cuda
        # GRPO's num_iterations: each step's batches train that many consecutive steps (TRL's RepeatSampler)
        self.repeat = int(getattr(objective, "repeat_steps", 1))
        self.steps_per_epoch = self.repeat * plans.steps_per_epoch(len(train_data), batch_size=t.batch_size,
                                                                   grad_accum=t.grad_accum, processes=self.processes)
        self.max_steps = t.max_steps or math.ceil(self.steps_per_epoch * (t.epochs or 1.0))
        # torch's fused AdamW/SGD skip a flagged step on the device; FSDP2's DTensors and DeepSpeed's own
        # optimizer take the unfused path, where the host reads the flag (one read per step, said in docs).
        fused = self.strategy in ("single", "ddp")
        optimizer = build_optimizer(config, model, fused=fused)
        self.scheduler = build_scheduler(config, optimizer, self.max_steps)
        # wrapped: what trains (DDP/FSDP/DeepSpeed around the model); model: the PeftModel itself, for evaluation,
        # checkpoints and callbacks (its parameter names are peft's, whatever the strategy).
        self.wrapped, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.model = self.accelerator.unwrap_model(self.wrapped)
        self.device_skip = skips_on_device(self.optimizer.optimizer) and self.strategy != "deepspeed"
        self.trainable = [p for p in self.wrapped.parameters() if p.requires_grad]
        self.state = LoopState()
        self.window = LogWindow(self.processes)
        self.grad_norm: torch.Tensor | None = None
        self.last_checkpoint: Path | None = None
        self.signalled = False  # a stop signal agreed by every process at the last step boundary

    @property
    def step(self) -> int:
        return self.state.step

    # ------------------------------------------------------------------------------------------ the run
    def fit(self, *, evaluate_at_start: bool) -> None:
        """Train until max_steps or a stop; ``evaluate_at_start``: evaluate before the first step (step 0)."""
        p = self.parts
        self.wrapped.train()
        if p.progress is not None:
            p.progress.start(self.max_steps, self.state.step, main_process=self.is_main_process)
        dispatch(p.callbacks, "on_train_begin", self)
        if evaluate_at_start and len(self.eval_data):
            self.evaluate()
        p.checkpoints.restore_rng()  # a resumed run: every process's RNG as at its checkpoint, right before training
        while self.state.step < self.max_steps and not self._stopping():
            plan = self._epoch_plan(self.state.epoch)
            for micro_batches in self._steps_of(plan):
                self._optimizer_step(micro_batches)
                self._after_step(epoch_end=self.state.step_in_epoch == len(plan))
                if self.state.step >= self.max_steps or self._stopping():
                    break
            if self.state.step_in_epoch == len(plan):
                self.state.epoch, self.state.step_in_epoch = self.state.epoch + 1, 0
        dispatch(p.callbacks, "on_train_end", self.state.step, self)

    def _epoch_plan(self, epoch: int) -> plans.BatchPlan:
        t = self.settings
        kind = plans.order_kind(self.config)
        lengths = [len(self.train_data[i]["input_ids"]) for i in range(len(self.train_data))] \
            if kind == "group_by_length" else [0] * len(self.train_data)
        order = plans.epoch_order(lengths, seed=t.seed, epoch=epoch, kind=kind, global_batch=t.batch_size * self.processes)
        return plans.epoch_plan(order, batch_size=t.batch_size, grad_accum=t.grad_accum, processes=self.processes,
                                rank=self.rank, repeat=self.repeat)

    def _steps_of(self, plan: plans.BatchPlan):
        """The remaining steps of an epoch, each a list of (CPU batch, Counts), loaded ahead by the loader."""
        remaining = plan.steps[self.state.step_in_epoch:]
        flat = [batch for step in remaining for batch in step]
        loaded = iter(plans.loader(self.train_data, flat, self.collate, workers=self.workers, pin_memory=self.pin))
        for step in remaining:
            yield [next(loaded) for _ in step]

    # ------------------------------------------------------------------------------------------ one step
    def _optimizer_step(self, micro_batches: list) -> None:
        began = time.perf_counter()
        state, p = self.state, self.parts
        step = state.step + 1
        if p.layout_check is not None:
            p.layout_check(self.model, f"step {step}")
        dispatch(p.callbacks, "on_step_begin", step, self)
        micro_batches = self._prepared(micro_batches, step)
        own = [sum(getattr(c, name) for _, c in micro_batches) for name in ("supervised", "examples", "tokens")]
        supervised, examples, tokens = sum_on_host(own)  # the whole step's counts, every process (host integers)
        totals = StepTotals(tokens=supervised, examples=examples)
        step_loss = None
        for i, (batch, counts) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            self.accelerator.sync_gradients = last  # DeepSpeed steps, and DDP/FSDP reduce gradients, on the last
            with self._no_sync(last):
                loss, metrics = self.objective.compute(self.wrapped, plans.to_device(batch, self.device), totals)
                # DDP, FSDP and ZeRO average gradients over processes; each loss is already a share of the sum.
                self._backward(loss * self.processes)
            self.window.metrics.add_means(metrics, lambda name, b=batch: self.objective.metric_weight(name, b))
            step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
        self.grad_norm = self._clip()
        skip = p.guard.step_flag(step, step_loss, self.grad_norm, self._reduce_max if self.processes > 1 else None)
        dispatch(p.callbacks, "on_before_optimizer_step", step, self)
        self._update(skip)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.window.add_step(step_loss, self.grad_norm)
        state.step, state.step_in_epoch = step, state.step_in_epoch + 1
        state.tokens_seen += tokens
        state.supervised_seen += supervised
        if self._reads_device_at(step):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's GPU time belongs to training, not to what follows
        state.train_seconds += time.perf_counter() - began
        if self.settings.empty_cache_every and step % self.settings.empty_cache_every == 0 and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _prepared(self, micro_batches: list, step: int) -> list:
        """Objectives that make their batches during the step (GRPO generates its answers, KTO scores its mismatched
        pairs) do it here, before the totals are counted; the counts then come from what they return (a made batch
        says its input tokens as the host number ``input_tokens``, else the loaded batch's count stands)."""
        if type(self.objective).prepare_step is Objective.prepare_step:
            return micro_batches  # the default: the batches as loaded
        made = self.objective.prepare_step(self.model, [batch for batch, _ in micro_batches], step)
        return [(batch, plans.Counts(int(batch.get("input_tokens", counts.tokens)), int(self.objective.tokens_in(batch)),
                                     int(self.objective.examples_in(batch))))
                for batch, (_, counts) in zip(made, micro_batches)]

    def _no_sync(self, last: bool):
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.wrapped)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.strategy == "deepspeed":
            self.accelerator.backward(loss, scale_wrt_gas=False)  # the loss is already this micro-batch's share
        else:
            self.accelerator.backward(loss)

    def _clip(self) -> torch.Tensor:
        """Clip to train.max_grad_norm (or only measure, when off): the total norm, on the device."""
        max_norm = self.settings.max_grad_norm or float("inf")
        norm = self.accelerator.clip_grad_norm_(self.trainable, max_norm)
        return norm if torch.is_tensor(norm) else torch.tensor(float("nan") if norm is None else norm)

    @staticmethod
    def _reduce_max(tensor: torch.Tensor) -> torch.Tensor:
        """The maximum over processes, on the device (no host read: the collective is queued like a kernel)."""
        out = tensor.clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX)
        return out

    def _update(self, skip: torch.Tensor) -> None:
        """The optimizer step, unless ``skip`` is set. Fused torch optimizers read the flag on the device (the
        GradScaler mechanism); any other optimizer needs the host to read it: one read per step."""
        inner = self.optimizer.optimizer
        if self.device_skip:
            inner.found_inf = skip.to(torch.float32)
            try:
                self.optimizer.step()
            finally:
                del inner.found_inf
            return
        guard = self.parts.guard
        guard.read()
        if not (guard.last_bad or guard.tripped):
            self.optimizer.step()

    # ------------------------------------------------------------------------------------------ boundaries
    def _logs_at(self, step: int) -> bool:
        every = self.settings.log_every
        return step == 1 or step % every == 0 or step == self.max_steps

    def _evaluates_at(self, step: int) -> bool:
        every = self.config.eval.every
        return bool(len(self.eval_data) and every and step % every == 0)

    def _saves_at(self, step: int, epoch_end: bool) -> bool:
        every = self.settings.save_every
        # The last step is saved too when checkpoints are on (a max_steps that ends mid-epoch, off the schedule):
        # the run's final state is resumable, e.g. to train it further with a larger max_steps.
        return epoch_end or bool(every and (step % every == 0 or step == self.max_steps))

    def _reads_device_at(self, step: int) -> bool:
        return self._logs_at(step) or self._evaluates_at(step) or self._saves_at(step, False)

    def _after_step(self, *, epoch_end: bool) -> None:
        """Log, evaluate, tell the callbacks, save, in that order; the checkpoint holds this step's history."""
        p, step = self.parts, self.state.step
        signalled = self._signal_everywhere()  # recorded whenever it came (even mid-save): acted on here
        saves = self._saves_at(step, epoch_end) or signalled
        logs: dict = {}
        if self._logs_at(step):
            logs = self._read_and_log(step)
        elif self._evaluates_at(step) or saves:
            p.guard.read()  # a checkpoint is only taken after a good step
        if self._evaluates_at(step) and not p.guard.tripped:
            logs = {**logs, **self.evaluate()}
        if p.progress is not None:
            p.progress.advance(step)
        # The callbacks hear of the step before its checkpoint, so the state a checkpoint saves of them has seen
        # every event of the step it is the checkpoint of (a resume starts with the next step's events).
        dispatch(p.callbacks, "on_step_end", step, logs)
        if saves and not p.guard.tripped:
            self.save()

    def _signal_everywhere(self) -> bool:
        """A signal received by any process, agreed by all at this step boundary (they must stop at the same step):
        a host-side sum on the CPU group, no device read. A signal that arrives later (during this step's save, say)
        is recorded by the handler and agreed at the next boundary: never dropped."""
        own = int(self.parts.stop.signal or 0)
        if self.processes == 1:
            self.signalled = bool(own)
            return self.signalled
        received, total = sum_on_host([1 if own else 0, own])
        if received and self.parts.stop.signal is None:
            self.parts.stop.signal = total // received  # the signal the others received (SIGINT or SIGTERM)
        self.signalled = bool(received)
        return self.signalled

    def _read_and_log(self, step: int) -> dict:
        """The one host read of a logging step: the window's sums (reduced over processes), the gradient norm and
        the guard's flags, then the log line everyone sees (history, trackers, progress, callbacks)."""
        p = self.parts
        extra = [self.grad_norm]
        flags = p.guard.pending_flags()
        if flags is not None:
            extra.append(flags)
        reduce = self.reduce_sum if self.processes > 1 else None
        values, (grad_norm, *flat_flags) = self.window.read(reduce, self.device, extra)
        p.guard.apply(flat_flags)
        values["grad_norm"] = grad_norm
        values["learning_rate"] = self.scheduler.get_last_lr()[0]
        values["epoch"] = round(self.state.epoch + self.state.step_in_epoch / self.steps_per_epoch, 4)
        values.update(self._throughput())
        values.update(peak_memory())
        return self.record(step, values)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")

    def _throughput(self) -> dict:
        s = self.state
        if not s.train_seconds:
            return {}
        return {"tokens_per_second": round(s.tokens_seen / s.train_seconds, 1),
                "supervised_tokens_per_second": round(s.supervised_seen / s.train_seconds, 1),
                "num_input_tokens_seen": s.tokens_seen, "supervised_tokens_seen": s.supervised_seen}

    def record(self, step: int, values: dict) -> dict:
        """Values logged at ``step`` into the history, trackers, progress and best-step selection."""
        p = self.parts
        values = p.history.add(step, values)
        shown = {k: v for k, v in values.items() if k not in ("num_input_tokens_seen", "supervised_tokens_seen")}
        if p.trackers is not None:
            p.trackers.log(step, shown)
        if p.progress is not None:
            is_eval = any(k.startswith("eval_") for k in values)
            (p.progress.evaluated if is_eval else p.progress.log)(step, shown)
        p.best.observe(step, values, self.model)
        return shown

    def _stopping(self) -> bool:
        """Stop after this step: a signal agreed at this boundary (and saved), a tripped guard, early stopping. Each
        is the same on every process (reduced, or decided from reduced values)."""
        p = self.parts
        return bool(self.signalled or p.guard.tripped or p.best.stopped_at is not None)

    def evaluate(self) -> dict:
        """Evaluate now (training/evaluation.py); returns the values logged."""
        from lorafit.training.evaluation import evaluate

        return evaluate(self)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self) -> Path | None:
        """A checkpoint of this step on the main process, when the guard says the state is good. Every process
        takes part (the adapter, optimizer and per-process state are gathered)."""
        p, step = self.parts, self.state.step
        if not p.guard.clean:
            return None  # only the state after a good step is saved
        adapter = adapter_state(self.wrapped, self.accelerator)
        if not p.guard.weights_finite(adapter, step):  # identical adapter on every process: the same decision
            return None
        folder = p.checkpoints.save(self, adapter)
        if folder is not None:
            self.last_checkpoint = folder
            dispatch(p.callbacks, "on_save", step, folder)
        return folder

    def finish(self) -> None:
        """After training: every process waits for the main process's last writes."""
        barrier()
