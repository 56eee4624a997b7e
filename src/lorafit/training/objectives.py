"""Training objectives: what the loss of a batch is, and which metrics come with it.

An ``Objective`` is given the model and one micro-batch and returns ``(loss, metrics)``. The training loop
(training/loop.py) calls it for every training micro-batch and every evaluation batch: supervised fine-tuning,
DPO, ORPO, the contrastive loss and a class of your own (``objective.type: package.module:ClassName``) all take the
same path.

Gradient accumulation. The loss a micro-batch returns is its share of the optimizer step's loss, so that the
gradients summed over the step's micro-batches equal those of one big batch. ``StepTotals`` carries what the
step holds in total over all its micro-batches and processes (the loop counts it on the host before the first
micro-batch of the step): ``tokens``, the supervised tokens (``tokens_in``), and ``examples``, the examples
(rows, pairs, triplets: ``examples_in``). A per-token term is divided by ``tokens``, a per-example term by
``examples``; with batch 4 x accumulation 1 and batch 1 x accumulation 4 over the same examples, both sums are the
same sums over the same divisors. An evaluation passes the totals of the whole eval set, so the batches' losses add
up to its mean. Without totals each batch is normalised by its own counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorafit.data.labels import IGNORE_INDEX
from lorafit.errors import LorafitError
from lorafit.model.supervised_head import POSITIONS, labelled_logprobs, on_grid, with_positions
from lorafit.model.token_logprobs import next_token_logprobs, next_token_targets, transformers_model, use_causal_lm_loss


@dataclass(frozen=True)
class StepTotals:
    """Counts over every micro-batch of one optimizer step (or one evaluation batch)."""

    tokens: torch.Tensor | int | None  # supervised tokens whose loss is taken (labels[..., 1:] != IGNORE_INDEX)
    examples: torch.Tensor | int | None  # examples: rows for SFT, triplets for the contrastive objective


class Objective:
    """The loss interface. Subclass it, set ``data`` and implement ``compute``.

    ``data``: the batches it needs: "sft" (``input_ids``, ``attention_mask``, ``labels``, or a packed row) or
    "triplets" (``lorafit.data.triplets``: 3n rows, benign first, then counterfactual, then injection) or
    "preference" (``lorafit.data.pairs``: 2n rows, the chosen answers first, then the rejected ones) or
    "unpaired" (``lorafit.data.unpaired``: n answers labelled ``desirable``) or "prompts" (``lorafit.data.prompts``:
    n left-padded prompts and their rows; the objective makes its answers in ``prepare_step``).
    ``compute`` returns the loss (already normalised by ``totals``, see the module docstring) and a dict of
    metric name -> value, each a mean over the batch's examples (``metric_weight``). Return values as 0-d tensors
    left on the device (no ``.item()``): the training loop reads every metric once, at a logging step, so a step
    that does not log never waits for the device. Plain floats are accepted too. Metrics are logged as they are named in
    training and with an ``eval_`` prefix in evaluation.
    """

    data: str = "sft"
    metric_names: tuple[str, ...] = ()

    def compute(self, model, batch: dict, totals: StepTotals | None = None) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError(f"{type(self).__name__}.compute(model, batch, totals) is not implemented")

    def examples_in(self, batch: dict) -> int:
        """How many examples a batch holds (for ``StepTotals.examples``): one per row by default. Called with the
        CPU batch: counting never waits for the device."""
        return int(batch["input_ids"].size(0))

    def tokens_in(self, batch: dict) -> int:
        """The supervised tokens of a batch (for ``StepTotals.tokens``): labels with a target (the first label of a
        row never has one). Called with the CPU batch."""
        if "labels" not in batch:
            return 0
        return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())

    def host_inputs(self, batch: dict) -> dict:
        """What the objective adds to a CPU batch before it goes to the device (called in the loader, with the
        counts: training/batches.py's CountingCollator), so that the step needs no device read to make it. The
        batch itself by default; supervised fine-tuning and the preference objectives add the positions their head
        runs on (model/supervised_head.py)."""
        return batch

    def metric_weight(self, name: str, batch: dict) -> float:
        """What a metric's batch mean is a mean over, to average it across batches exactly: examples by default.
        Called with the CPU batch."""
        return self.examples_in(batch)

    def prepare_step(self, model, batches: list[dict], step: int) -> list[dict]:
        """Called with the micro-batches of optimizer step ``step`` before its totals are counted; returns the
        batches to train on. An objective that makes its batches during training (generation) overrides it."""
        return batches

    def state_dict(self) -> dict:
        """What the objective carries from step to step, for checkpoints (tensors and plain values only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Put back what ``state_dict`` returned (a resumed run)."""


class SupervisedObjective(Objective):
    """Next-token loss on the supervised tokens, summed and divided by the step's supervised token count.

    The log-probabilities come from model/token_logprobs.py (float32 one chunk at a time, so no float32 copy of
    the logits as transformers' own loss makes), which also becomes the model's own loss (``use_causal_lm_loss``).
    The head runs on the supervised positions only (model/supervised_head.py: positions made on the host by
    ``host_inputs``): the other positions' logits would have had no loss and a gradient of zeros.
    With the fused kernels on (``model.kernels``: liger) the model's fused loss is used instead, with
    ``num_items_in_batch``: it computes the head and the loss chunk by chunk, and no logits exist at all.

    With ``sources`` (the names of several training sources), a training batch carries ``source_ids`` and the
    objective also returns each source's summed token loss and count as ``loss/<source>`` metrics
    (training/source_loss.py), from the same token log-probabilities."""

    def __init__(self, sources: list[str] | None = None):
        self.sources = list(sources or [])

    def host_inputs(self, batch: dict) -> dict:
        return with_positions(batch)

    def compute(self, model, batch, totals=None):
        from lorafit.model.kernels import LIGER_MARK
        from lorafit.training.source_loss import PREFIX, split_source_ids, sums_by_source

        batch, source_ids = split_source_ids(batch)  # per-token sources are not a model input
        positions = batch.get(POSITIONS)  # host_inputs made them in the loader; a batch from elsewhere has none
        batch = {k: v for k, v in batch.items() if k != POSITIONS}
        tokens = None if totals is None else totals.tokens
        if getattr(getattr(model, "module", model), LIGER_MARK, None) == "liger":  # DDP wraps the model
            kwargs = {} if tokens is None else {"num_items_in_batch": tokens}
            return model(**batch, **kwargs).loss, {}
        use_causal_lm_loss(model)  # the model's own loss (model(**batch).loss) is then this same computation
        labels = batch["labels"]
        mask = next_token_targets(labels) != IGNORE_INDEX
        outputs, logps, at = labelled_logprobs(model, {k: v for k, v in batch.items() if k != "labels"}, labels,
                                               positions)  # the head on the supervised positions only
        loss = divide_by_count(-logps.sum(), tokens, mask.sum() if at is None else at.numel())
        if outputs.get("aux_loss") is not None:  # a mixture of experts' router balance loss (output_router_logits),
            coefficient = transformers_model(model).config.router_aux_loss_coef  # added as the model's loss adds it
            loss = loss + coefficient * outputs.aux_loss.to(loss.device)
        metrics = {}
        if source_ids is not None and self.sources and model.training:
            grid = on_grid(logps.detach(), at, labels.shape)
            sums, counts = sums_by_source(-grid, mask, source_ids, len(self.sources))
            metrics = {f"{PREFIX}{name}": (sums[i], counts[i]) for i, name in enumerate(self.sources)}
        return loss, metrics


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of tokens it covers. Position t predicts label t+1, as in
    transformers' ``ForCausalLMLoss``; float32 chunk by chunk (model/token_logprobs.py)."""
    logps, mask = next_token_logprobs(logits, labels)
    return -logps.sum(), mask.sum()


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per row from ``hidden`` (B, T, H) over the positions where ``mask`` (B, T) is 1.

    last_token: the last masked position (the prompt's final token: what the model answers from).
    mean: the average over masked positions.
    """
    mask = mask.to(hidden.dtype)
    if how == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, H)
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)  # (B, T)
    last = (positions * mask.long()).amax(1)  # (B,)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # (B, H)


def divide_by_count(total: torch.Tensor, count, fallback) -> torch.Tensor:
    """``total`` over the step's ``count`` (``StepTotals``), or over ``fallback``, the batch's own, without one."""
    count = fallback if count is None else count
    if torch.is_tensor(count):
        count = count.to(total.device, total.dtype)
        return total / count.clamp(min=1)
    return total / max(count, 1)


class ContrastiveObjective(Objective):
    """Causal contrastive loss on triplets (benign b, counterfactual cf, injection inj), one forward pass of 3n rows:

        L = lambda_causal * (-cos(b, cf) / T) + lambda_spurious * (cos(b, inj) / T) + lambda_task * CE(benign answer)

    The cosine terms are means over triplets, CE is a mean over the benign answers' supervised tokens.
    Under gradient accumulation each micro-batch returns sum_i(cos terms) / totals.examples + sum_tokens(CE) /
    totals.tokens, so the step's micro-batches add up to the full-batch loss above (module docstring); Trainer
    must then not divide by the accumulation steps again (``loss_is_scaled_for_ga``).
    The representation of an input is the hidden state at ``layer`` pooled over its prompt tokens (for the
    benign row, the tokens before the answer: causal attention makes them independent of the answer).
    """

    data = "triplets"
    metric_names = ("causal_stability", "spurious_separation", "causal_discrimination", "task_loss")

    def examples_in(self, batch):
        return int(batch["input_ids"].size(0)) // 3

    def metric_weight(self, name, batch):
        if name == "task_loss":  # a mean over the benign answers' supervised tokens
            return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
        return self.examples_in(batch)

    def __init__(self, *, lambda_causal=1.0, lambda_spurious=1.0, lambda_task=1.0, temperature=0.07, layer=-1,
                 pooling="last_token"):
        self.lambda_causal, self.lambda_spurious, self.lambda_task = lambda_causal, lambda_spurious, lambda_task
        self.temperature, self.layer, self.pooling = temperature, layer, pooling

    @classmethod
    def from_config(cls, objective) -> "ContrastiveObjective":
        return cls(lambda_causal=objective.lambda_causal, lambda_spurious=objective.lambda_spurious,
                   lambda_task=objective.lambda_task, temperature=objective.temperature, layer=objective.layer,
                   pooling=objective.pooling)

    def representations(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled representations (3n, H), logits (3n, T, V)) from one forward pass."""
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True, use_cache=False)
        hidden_states = outputs.hidden_states
        if not -len(hidden_states) <= self.layer < len(hidden_states):
            raise LorafitError(
                f"objective.layer: {self.layer} is out of range: the model has {len(hidden_states) - 1} layers",
                fix=f"use 0..{len(hidden_states) - 1} (0 = embeddings) or a negative index (-1 = last)",
            )
        return pool(hidden_states[self.layer], batch["pool_mask"], self.pooling), outputs.logits

    def compute(self, model, batch, totals=None):
        pooled, logits = self.representations(model, batch)
        n = pooled.size(0) // 3
        pooled = pooled.to(torch.promote_types(pooled.dtype, torch.float32))  # cosines in fp32 under bf16 training
        benign, counterfactual, injection = pooled.split(n)  # each (n, H)
        cos_cf = F.cosine_similarity(benign, counterfactual, dim=-1)  # (n,)
        cos_inj = F.cosine_similarity(benign, injection, dim=-1)  # (n,)
        ce_sum, ce_tokens = token_loss_sum(logits[:n], batch["labels"][:n])

        examples = None if totals is None else totals.examples
        tokens = None if totals is None else totals.tokens
        contrast = (-self.lambda_causal * cos_cf + self.lambda_spurious * cos_inj).sum() / self.temperature
        loss = divide_by_count(contrast, examples, n) + self.lambda_task * divide_by_count(ce_sum, tokens, ce_tokens)

        # Metrics stay on the device (0-d tensors): the loop reads them once, at a logging step.
        stability, similarity = cos_cf.detach().mean(), cos_inj.detach().mean()
        metrics = {
            "causal_stability": stability,
            "spurious_separation": 1.0 - similarity,
            "causal_discrimination": stability - similarity,
            "task_loss": ce_sum.detach() / ce_tokens.clamp(min=1),
        }
        return loss, metrics


def build_objective(objective_config, *, config_dir=None, allow_external_code: bool = False) -> Objective:
    """The Objective an ``objective:`` section names (a plugin class is imported, docs/objectives.md). A plugin
    module is searched in ``config_dir`` (default: the folder of the config file the section came from)."""
    if objective_config.type == "sft":
        return SupervisedObjective()
    if objective_config.type == "contrastive":
        return ContrastiveObjective.from_config(objective_config)
    if objective_config.type in ("dpo", "orpo", "simpo"):
        from lorafit.training.preference import preference_objective

        return preference_objective(objective_config)
    if objective_config.type == "kto":
        from lorafit.training.kto import KTOObjective

        return KTOObjective(beta=objective_config.beta, desirable_weight=objective_config.desirable_weight,
                            undesirable_weight=objective_config.undesirable_weight)
    if objective_config.type == "grpo":
        raise LorafitError("objective.type: grpo is built with its reward functions and seed",
                           fix="use lorafit.training.run_setup.objective_for(config, callbacks)")
    from lorafit.training.plugins import load_plugin

    cls = load_plugin(objective_config.type, base=Objective, field="objective.type",
                      config_dir=config_dir or objective_config.config_dir, allow_external_code=allow_external_code)
    try:
        objective = cls(**objective_config.options)
    except TypeError as exc:
        raise LorafitError(f"objective.options: {objective_config.type} does not accept them ({exc})",
                           fix="pass only the keyword arguments its constructor takes") from None
    if objective.data not in ("sft", "triplets", "preference", "unpaired", "prompts"):
        raise LorafitError(f"objective.type: {objective_config.type}.data is {objective.data!r}",
                           fix='set the class attribute data to "sft", "triplets", "preference", "unpaired" or '
                           '"prompts"')
    return objective
