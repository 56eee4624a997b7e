"""Preference objectives: DPO (with its IPO and hinge variants), ORPO and SimPO, as lorafit ``Objective``s (KTO,
on unpaired answers, is in training/kto.py).

A batch is 2n rows (``lorafit.data.pairs.PreferenceCollator``): n prompt + chosen answer rows, then the n
prompt + rejected answer rows, labelled on the answer tokens only. log p(answer | prompt) is the sum of the answer
tokens' log-probabilities (the labels say which tokens count, so only the response counts).

DPO  (Rafailov et al. 2023), per pair, with policy pi (base + adapter) and reference pi_ref:
         delta = [log pi(c) - log pi_ref(c)] - [log pi(r) - log pi_ref(r)]
         sigmoid: -log sigmoid(beta * delta)     hinge: max(0, 1 - beta * delta)
         ipo:     (delta_per_token - 1 / (2 beta))^2, each log-ratio divided by its answer's token count
     The reference is the base model: the same model with the adapter disabled (``PeftModel.disable_adapter``),
     as TRL's DPOTrainer does for a PEFT model with ``ref_model=None``. No second copy of the weights exists.
     Rewards (logged): beta * (log pi - log pi_ref) of each answer.
ORPO (Hong et al. 2024), reference-free, with length-normalised log-probabilities a = log pi / tokens:
         loss = -a(c) - beta * log sigmoid(log odds(c) - log odds(r)),   log odds(y) = a(y) - log(1 - exp(a(y)))
     Rewards (logged): beta * a of each answer, as TRL's ORPOTrainer logs them.

The equations, defaults and metric meanings are TRL 1.16's (trl/trainer/dpo_trainer.py, trl/experimental/orpo);
tests/test_preference.py checks the DPO loss and rewards against TRL's DPOTrainer on the same batch. They are
written here rather than run through TRL's trainers because those re-tokenise every row with their own chat-template
call (DPOTrainer._prepare_dataset takes no pre-tokenised pairs), keep their metric accumulators outside
checkpoints (a resumed run would log different means) and replace the model's forward with a fused LM head; as
an Objective the loss runs inside lorafit's loop (training/loop.py), so lorafit's labels, checkpoints, exact resume, gradient
accumulation and metrics history apply unchanged.

Every loss term is per pair: a micro-batch returns sum over its pairs / ``totals.examples`` (the pairs of the whole
optimizer step), so batch 4 x accumulation 1 and batch 1 x accumulation 4 give the same gradients
(training/objectives.py). ORPO's NLL term is each chosen answer's mean token loss, averaged over pairs (TRL averages
over all chosen tokens of a batch, which is not additive across micro-batches).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from lorafit.errors import LorafitError
from lorafit.model.lora_init import base_view
from lorafit.data.labels import IGNORE_INDEX
from lorafit.model.supervised_head import POSITIONS, labelled_logprobs, row_sums, with_positions
from lorafit.model.token_logprobs import next_token_logprobs, next_token_targets
from lorafit.training.objectives import Objective, divide_by_count


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of the labelled tokens (B,) and how many there are (B,), from logits on
    every position (a plugin's own forward; the tests' whole-grid reference). The objectives call
    ``forward_answer_logps``, which equals it with the head on the answer positions only. Position t predicts label
    t+1, as in ``objectives.token_loss_sum``; float32 chunk by chunk (model/token_logprobs.py), so the logits of 2n
    rows are never upcast at once."""
    logps, mask = next_token_logprobs(logits, labels)
    return logps.sum(-1), mask.sum(-1)


def forward_answer_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of ``batch``'s rows and, per row, the summed answer log-probability and the answer's token count
    (as ``answer_logps``), with the head on the answer positions only (model/supervised_head.py: the prompt
    positions' logits would have no loss; ``host_inputs`` made the positions in the loader)."""
    labels = batch["labels"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    _, logps, at = labelled_logprobs(model, inputs, labels, batch.get(POSITIONS))
    return row_sums(logps, at, labels.shape), (next_token_targets(labels) != IGNORE_INDEX).sum(-1)


@contextmanager
def reference_model(model):
    """The base model inside the block, gradients off, no copy: the adapter switched off, or after a mutating init
    (PiSSA, OLoRA: the base holds the residual) the step-0 adapter put back (``model.lora_init.base_view``)."""
    peft_model = getattr(model, "module", model)  # DDP wraps the PeftModel
    if not hasattr(peft_model, "disable_adapter"):
        raise LorafitError(f"DPO needs the adapter model to compute the reference; got {type(peft_model).__name__}",
                           why="the reference is the base model, obtained by switching the adapter off")
    with torch.no_grad(), base_view(peft_model):
        yield


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class PreferenceObjective(Objective):
    """Shared by DPO and ORPO: 2n rows per batch, one example per pair."""

    data = "preference"

    def __init__(self, *, beta: float = 0.1):
        self.beta = beta

    def examples_in(self, batch):
        return int(batch["input_ids"].size(0)) // 2

    def host_inputs(self, batch: dict) -> dict:
        return with_positions(batch)  # the answer positions, for forward_answer_logps

    @staticmethod
    def _rewards(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
        """Means over the batch's pairs, left on the device (the loop reads them at logging steps only)."""
        return {"reward_chosen": chosen.mean(), "reward_rejected": rejected.mean(),
                "reward_margin": (chosen - rejected).mean(),
                "reward_accuracy": (chosen > rejected).float().mean()}


class DPOObjective(PreferenceObjective):
    metric_names = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")

    def __init__(self, *, beta: float = 0.1, loss_type: str = "sigmoid"):
        super().__init__(beta=beta)
        self.loss_type = loss_type

    def pair_losses(self, policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Per pair (n,) from the 2n rows' answer log-probabilities (policy, reference) and token counts."""
        ratios = (policy - reference).chunk(2)  # chosen (n,), rejected (n,)
        if self.loss_type == "ipo":
            chosen_tokens, rejected_tokens = tokens.chunk(2)
            delta = ratios[0] / chosen_tokens.clamp(min=1) - ratios[1] / rejected_tokens.clamp(min=1)
            return (delta - 1 / (2 * self.beta)) ** 2
        delta = ratios[0] - ratios[1]
        if self.loss_type == "hinge":
            return torch.relu(1 - self.beta * delta)
        return -F.logsigmoid(self.beta * delta)

    def compute(self, model, batch, totals=None):
        # The reference first: after a PiSSA/OLoRA init, base_view writes the step-0 adapter into the parameters
        # in place, which must not happen while the policy's graph holds them for backward.
        with reference_model(model):
            reference, _ = forward_answer_logps(model, batch)
        policy, tokens = forward_answer_logps(model, batch)
        losses = self.pair_losses(policy, reference, tokens)
        loss = divide_by_count(losses.sum(), None if totals is None else totals.examples, losses.size(0))
        rewards = (self.beta * (policy - reference).detach()).chunk(2)
        return loss, self._rewards(*rewards)


class ORPOObjective(PreferenceObjective):
    metric_names = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "nll_loss",
                    "log_odds_ratio")

    def compute(self, model, batch, totals=None):
        logps, tokens = forward_answer_logps(model, batch)
        chosen, rejected = (logps / tokens.clamp(min=1)).chunk(2)  # mean log-probability per answer token, (n,)
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        losses = -chosen - self.beta * F.logsigmoid(log_odds)
        loss = divide_by_count(losses.sum(), None if totals is None else totals.examples, losses.size(0))
        metrics = self._rewards(self.beta * chosen.detach(), self.beta * rejected.detach())
        metrics |= {"nll_loss": -chosen.detach().mean(), "log_odds_ratio": log_odds.detach().mean()}
        return loss, metrics


class SimPOObjective(PreferenceObjective):
    """SimPO (Meng et al. 2024): reference-free, on length-normalised log-probabilities a = log pi / tokens,

        loss = -log sigmoid(beta * (a(c) - a(r)) - gamma)

    TRL's CPOTrainer with loss_type "simpo" and cpo_alpha 0 (trl/experimental/cpo: cpo_loss writes it as
    beta * (a(c) - a(r) - gamma / beta)); rewards (logged): beta * a of each answer."""

    metric_names = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")

    def __init__(self, *, beta: float = 2.0, gamma: float = 0.5):
        super().__init__(beta=beta)
        self.gamma = gamma

    def compute(self, model, batch, totals=None):
        logps, tokens = forward_answer_logps(model, batch)
        chosen, rejected = (logps / tokens.clamp(min=1)).chunk(2)  # (n,) each
        losses = -F.logsigmoid(self.beta * (chosen - rejected) - self.gamma)
        loss = divide_by_count(losses.sum(), None if totals is None else totals.examples, losses.size(0))
        return loss, self._rewards(self.beta * chosen.detach(), self.beta * rejected.detach())


def preference_objective(objective_config) -> PreferenceObjective:
    """The Objective of ``objective.type: dpo | orpo | simpo``."""
    if objective_config.type == "dpo":
        return DPOObjective(beta=objective_config.beta, loss_type=objective_config.loss_type)
    if objective_config.type == "simpo":
        return SimPOObjective(beta=objective_config.beta, gamma=objective_config.simpo_gamma)
    return ORPOObjective(beta=objective_config.beta)
