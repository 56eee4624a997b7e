"""GRPO (group relative policy optimization, Shao et al. 2024) as a lorafit ``Objective``, on lorafit's own loop.

Per optimizer step (``prepare_step``, before the step's totals are counted): each prompt of the step's micro-batches
gets ``num_generations`` answers sampled from the policy, in one batched generation for the whole step as TRL samples
its generation batch (training/rollout.py), scored by the reward functions and turned into advantages A (reward minus its group's mean, over the group's std). Then per micro-batch (``compute``),
with pi the policy's token probability now, pi_old at generation and pi_ref the base model's (adapter off):

    ratio   r_t = pi(y_t) / pi_old(y_t)          (1 unless num_iterations > 1 reuses the answers)
    token   l_t = -min(r_t A, clip(r_t, 1 - epsilon, 1 + epsilon_high) A) + beta * KL_t,
            KL_t = r_t (pi_ref/pi - log(pi_ref/pi) - 1)       (k3 estimator, bias-corrected; beta 0: no reference)
    loss    grpo:    mean over answers of (mean over the answer's tokens of l_t)
            dr_grpo: sum of l_t / (answers x max_completion_length)
            dapo:    sum of l_t / answer tokens                               (all over the whole optimizer step)

The log-probabilities use the sampling distribution (logits / temperature). Equations, defaults and metric names
follow TRL 1.16 (trl/trainer/grpo_trainer.py: _compute_loss); tests/test_grpo.py checks loss and gradient against
GRPOTrainer._compute_loss for each loss_type. As for every objective, a micro-batch returns its share of the step:
its sums over the step's answers (``StepTotals.examples``) or answer tokens (``StepTotals.tokens``), so batch 4 x
accumulation 1 trains like batch 1 x accumulation 4, on any number of processes.

``num_iterations`` > 1: the loop repeats each step's prompts that many steps (TRL's RepeatSampler); the answers,
advantages and pi_old of the first are kept (``state_dict``: a checkpoint between them resumes exactly).
"""

from __future__ import annotations

import torch

from lorafit.errors import LorafitError
from lorafit.evaluate.generate import Sampling, generation_config, stop_token_ids
from lorafit.model.token_logprobs import token_logprobs
from lorafit.training.batches import to_device
from lorafit.training.strategy import rank, sum_on_host, world_size
from lorafit.training.objectives import Objective
from lorafit.training.preference import reference_model
from lorafit.training.rewards import score
from lorafit.training.rollout import (Timer, advantages, generate_answers, merged_prompts, reward_metrics,
                                      sampling_stream, seed_of, unbiased_std)

SAMPLES_PER_STEP = 4  # answers of the step's first prompt kept for the report (completion_samples.jsonl)
HOST_KEYS = ("records",)  # what a checkpointed batch leaves out (rows are loaded again on resume)


def token_logps(model, input_ids, attention_mask, width: int, temperature: float) -> torch.Tensor:
    """log pi(y_t) of the last ``width`` tokens of each row (N, width), from logits / temperature in float32 one
    chunk at a time (model/token_logprobs.py). Only the logits that predict them are made (``logits_to_keep``)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   logits_to_keep=width + 1).logits[:, :-1]  # (N, width, V): position t predicts token t + 1
    return token_logprobs(logits, input_ids[:, -width:], temperature=temperature)


def token_losses(logps, old, ref, advantage, *, beta: float, epsilon: float, epsilon_high: float):
    """(l_t (N, C), per-token KL or None, clipped (N, C) bool) as TRL computes them."""
    ratio = torch.exp(logps - old)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    a = advantage.unsqueeze(1)
    losses = -torch.min(ratio * a, clipped_ratio * a)
    kl = None
    if beta != 0.0:
        # times the ratio: TRL's use_bias_correction_kl (default on), the unbiased reverse-KL gradient
        # (DeepSeek-V3.2); the ratio is differentiable, so this changes the gradient even where it equals 1
        kl = (torch.exp(ref - logps) - (ref - logps) - 1) * ratio
        losses = losses + beta * kl
    clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))
    return losses, kl, clipped


class GRPOObjective(Objective):
    data = "prompts"
    metric_names = ("reward", "reward_std", "kl", "completion_length", "clip_ratio", "zero_std_groups",
                    "generation_seconds")

    def __init__(self, settings, rewards: list, *, seed: int):
        self.settings, self.rewards, self.seed = settings, rewards, seed
        self.epsilon_high = settings.epsilon_high if settings.epsilon_high is not None else settings.epsilon
        self.sampling = Sampling(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        self.tokenizer = None
        self.stop_ids: list[int] | None = None
        self.step = 0
        self.buffer: list[dict] | None = None  # the answers of the last generation, while num_iterations reuses them
        self.samples: list[dict] = []  # the last generation's first group, for completion_samples.jsonl

    @property
    def repeat_steps(self) -> int:
        """Consecutive optimizer steps on each batch of prompts (the loop's plan repeats them)."""
        return self.settings.num_iterations

    def use_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def examples_in(self, batch):
        """Answers: generated ones, or num_generations per prompt of a batch not yet generated."""
        return int(batch["completions"]) if "completions" in batch else \
            int(batch["input_ids"].size(0)) * self.settings.num_generations

    def tokens_in(self, batch):
        return int(batch.get("completion_tokens", 0))

    # ------------------------------------------------------------------------------------------ generation
    def prepare_step(self, model, batches, step):
        self.step = step
        if self.buffer is not None and (step - 1) % self.settings.num_iterations:
            return [{**b, "fresh": False} for b in self.buffer]  # an iteration on the answers already made
        device = next(model.parameters()).device
        batches = [to_device(b, device) for b in batches]  # the loop hands over the loader's CPU batches
        made = self.rollout(model, batches, seed_of(self.seed, step, rank()), across_processes=True)
        self.buffer = made if self.settings.num_iterations > 1 else None
        return made

    def rollout(self, model, batches: list[dict], seed: int, *, across_processes: bool,
                keep_samples: bool = True) -> list[dict]:
        """Answers to every prompt of ``batches``, scored, with advantages (and pi_old, pi_ref when needed)."""
        s = self.settings
        if self.tokenizer is None:
            raise LorafitError("the grpo objective has no tokenizer", fix="call use_tokenizer(tokenizer) first")
        if self.stop_ids is None:
            self.stop_ids = stop_token_ids(self.tokenizer, generation_config(model))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        with Timer() as timer, sampling_stream(seed):
            answered = generate_answers(model, merged_prompts(batches, pad_id), tokenizer=self.tokenizer,
                                        num_generations=s.num_generations,
                                        max_completion_length=s.max_completion_length, sampling=self.sampling,
                                        stop_ids=self.stop_ids, pad_id=pad_id)
        rollouts = answered.split([len(b["records"]) * s.num_generations for b in batches])
        rewards, problem = [], None
        try:
            rewards = [score(self.rewards, r.records, r.texts, r.completion_ids) for r in rollouts]
        except LorafitError as error:
            problem = error
        batch_std = self._agree(rewards, problem, across_processes)
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float32)
        made = []
        for i, (rollout, scores) in enumerate(zip(rollouts, rewards)):
            totals = (scores * weights.unsqueeze(0)).nansum(dim=1)  # (N,), TRL's sum_then_normalize
            advantage, group_std = advantages(totals, s.num_generations, s.scale_rewards, batch_std)
            metrics = reward_metrics(scores, totals, group_std, [r.name for r in self.rewards], s.num_generations)
            if i == 0:
                metrics["generation_seconds"] = (timer.seconds, 1.0)
            if i == 0 and keep_samples:
                self.samples = [{"where": rollout.records[j].where, "prompt": rollout.records[j].messages[-1]["content"],
                                 "completion": rollout.texts[j], "reward": float(totals[j]),
                                 "rewards": {r.name: float(scores[j, k]) for k, r in enumerate(self.rewards)}}
                                for j in range(min(SAMPLES_PER_STEP, s.num_generations))]
            made.append(self._batch(model, rollout, advantage, metrics))
        return made

    def _agree(self, rewards: list, problem, across_processes: bool) -> float | None:
        """Every process learns whether a reward failed anywhere (all stop together, nothing trained) and, for
        scale_rewards: batch, the std over every answer of the step; one host collective."""
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float32)
        flat = (torch.cat(rewards) * weights.unsqueeze(0)).nansum(dim=1) if rewards else torch.zeros(0)
        if not across_processes or world_size() == 1:
            if problem is not None:
                raise problem
            return float(unbiased_std(flat)) if self.settings.scale_rewards == "batch" and flat.numel() > 1 else None
        failed, count, total, squares = sum_on_host([float(problem is not None), float(flat.numel()),
                                                     float(flat.double().sum()), float((flat.double() ** 2).sum())],
                                                    dtype=torch.float64)
        if problem is not None:
            raise problem
        if failed:
            raise LorafitError("a reward function failed on another process (its message is in that process's "
                               "output): the step was not trained")
        if self.settings.scale_rewards != "batch" or count < 2:
            return None
        return float(max(squares - total * total / count, 0.0) / (count - 1)) ** 0.5

    def _batch(self, model, rollout, advantage: torch.Tensor, metrics: dict) -> dict:
        """The micro-batch compute() trains on; host counts as plain numbers (the loop counts without the device)."""
        s, device = self.settings, rollout.input_ids.device
        width = rollout.completion_mask.size(1)
        tokens = sum(len(ids) for ids in rollout.completion_ids)
        batch = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
                 "completion_mask": rollout.completion_mask, "advantages": advantage.to(device),
                 "completions": len(rollout.texts), "completion_tokens": tokens,
                 "input_tokens": int(rollout.attention_mask.sum()), "reward_metrics": metrics, "fresh": True,
                 "records": rollout.records}
        with torch.no_grad():
            if s.num_iterations > 1:  # later iterations clip against the policy that sampled the answers
                batch["old_logps"] = token_logps(model, rollout.input_ids, rollout.attention_mask, width,
                                                 s.temperature)
            if s.beta != 0.0:
                with reference_model(model):
                    batch["ref_logps"] = token_logps(model, rollout.input_ids, rollout.attention_mask, width,
                                                     s.temperature)
        return batch

    # ------------------------------------------------------------------------------------------ the loss
    def compute(self, model, batch, totals=None):
        s = self.settings
        sampled_here = "completion_mask" not in batch
        if sampled_here:  # an evaluation batch: its answers are sampled now, from a stream of their own
            seed = seed_of(self.seed, "eval", self.step, batch["records"][0].where)
            batch = self.rollout(model, [batch], seed, across_processes=False, keep_samples=False)[0]
        mask = batch["completion_mask"].to(torch.float32)
        logps = token_logps(model, batch["input_ids"], batch["attention_mask"], mask.size(1), s.temperature)
        old = batch.get("old_logps", logps.detach())
        losses, kl, clipped = token_losses(logps, old, batch.get("ref_logps"), batch["advantages"], beta=s.beta,
                                           epsilon=s.epsilon, epsilon_high=self.epsilon_high)
        answers, tokens = batch["completions"], batch["completion_tokens"]
        # A training micro-batch divides by the step's totals; a batch sampled here (evaluation), or one without
        # totals, by its own counts, weighted by its share of the evaluation's answers.
        own = sampled_here or totals is None or not totals.examples
        examples, all_tokens = (answers, tokens) if own else (totals.examples, totals.tokens)
        summed = losses * mask
        if s.loss_type == "grpo":
            loss = (summed.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / examples
        elif s.loss_type == "dr_grpo":
            loss = summed.sum() / (examples * s.max_completion_length)
        else:  # dapo
            loss = summed.sum() / max(all_tokens, 1)
        if sampled_here and totals is not None and totals.examples:
            loss = loss * answers / totals.examples
        covered = mask.sum().detach()
        metrics = {"clip_ratio": ((clipped * mask).sum().detach(), covered),
                   "completion_length": (float(tokens), float(answers))}
        if kl is not None:
            metrics["kl"] = ((kl * mask).sum().detach(), covered)
        if batch.get("fresh", True):
            metrics |= batch["reward_metrics"]
        return loss, metrics

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The step, and the answers later iterations reuse (without the host-only rows, loaded again on resume)."""
        kept = None if self.buffer is None or self.step % self.settings.num_iterations == 0 else \
            [{k: v for k, v in b.items() if k not in HOST_KEYS} | {"fresh": False} for b in self.buffer]
        return {"step": self.step, "buffer": kept}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.buffer = state["buffer"]
