"""GRPO's rollouts: answers sampled from the policy for a batch of prompts, scored, and turned into advantages.

    prompts (B, left-padded) --repeat each num_generations times--> generate (adapter on, eval mode, no_grad,
    lorafit's generate_from_ids: stop ids, chat template) --> answers cut at their end-of-turn --> rewards per
    function (training/rewards.py) --> weighted total --> advantage = (reward - group mean) / (group std + 1e-4)

Sampling draws from its own stream: the RNG of the whole process is forked and seeded from (seed, step, rank) for
the generation (transformers' sampler reads torch's global generator), then put back, so dropout and everything
training draws are untouched, and a resumed run samples the very answers the uninterrupted one sampled.

The advantage formula, its float32 arithmetic and the unbiased std are TRL's (GRPOTrainer
._generate_and_score_completions, sum_then_normalize; trl/trainer/utils.py: nanstd), so that a batch scored here
and in TRL gives the same advantages (tests/test_grpo.py).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass

import torch

from lorafit.evaluate.generate import Sampling, generate_from_ids, until_stop
from lorafit.hashing import sha256_text
from lorafit.training.callbacks import LorafitCallback

STD_EPSILON = 1e-4  # TRL's: advantages / (std + 1e-4)


@dataclass
class Rollout:
    """One micro-batch's answers: ``input_ids`` (N, P + C) the prompt (left-padded) and the answer (right-padded),
    ``completion_mask`` (N, C) 1 on the answer's tokens up to and including its end-of-turn, the answers' ids and
    texts on the host, and the prompt row of each answer (``records``: each row num_generations times in a row)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    completion_ids: list[list[int]]
    texts: list[str]
    records: list


    def split(self, sizes: list[int]) -> list["Rollout"]:
        """The answers of consecutive micro-batches of ``sizes`` answers each."""
        out, start = [], 0
        for size in sizes:
            rows = slice(start, start + size)
            out.append(Rollout(self.input_ids[rows], self.attention_mask[rows], self.completion_mask[rows],
                               self.completion_ids[rows], self.texts[rows], self.records[rows]))
            start += size
        return out


def merged_prompts(batches: list[dict], pad_id: int) -> dict:
    """The prompts of several PromptCollator batches as one batch, left-padded to the longest: a step's answers are
    sampled in one call (as TRL samples its generation batch), whatever micro-batches the step is cut into."""
    width = max(b["input_ids"].size(1) for b in batches)

    def widened(tensor, value):
        pad = torch.full((tensor.size(0), width - tensor.size(1)), value, dtype=tensor.dtype, device=tensor.device)
        return torch.cat([pad, tensor], dim=1)

    return {"input_ids": torch.cat([widened(b["input_ids"], pad_id) for b in batches]),
            "attention_mask": torch.cat([widened(b["attention_mask"], 0) for b in batches]),
            "records": [r for b in batches for r in b["records"]]}


def seed_of(*parts) -> int:
    """A 63-bit seed from the parts (run seed, step, rank ...): every combination its own stream."""
    return int(sha256_text(":".join(map(str, parts)))[:15], 16)


@contextlib.contextmanager
def sampling_stream(seed: int):
    """torch's generators (CPU and the current accelerator) seeded with ``seed`` inside the block, and restored after."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def generate_answers(model, batch: dict, *, tokenizer, num_generations: int, max_completion_length: int,
                     sampling: Sampling, stop_ids: list[int], pad_id: int) -> Rollout:
    """``num_generations`` sampled answers to each prompt of ``batch`` (a PromptCollator batch on the device)."""
    prompt_ids = batch["input_ids"].repeat_interleave(num_generations, dim=0)  # (N, P)
    prompt_mask = batch["attention_mask"].repeat_interleave(num_generations, dim=0)  # (N, P)
    new = generate_from_ids(model, prompt_ids, prompt_mask, max_new_tokens=max_completion_length, stop_ids=stop_ids,
                            pad_id=pad_id, sampling=sampling)  # (N, C)
    kept = [until_stop(row, stop_ids) for row in new.tolist()]  # the host read generation needs anyway
    completion_mask = torch.zeros(new.shape, dtype=torch.long)
    for row, (ids, _) in enumerate(kept):
        completion_mask[row, : len(ids)] = 1
    completion_mask = completion_mask.to(new.device)
    texts = [tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True).strip() for ids, stopped in kept]
    records = [record for record in batch["records"] for _ in range(num_generations)]
    return Rollout(torch.cat([prompt_ids, new], dim=1), torch.cat([prompt_mask, completion_mask], dim=1),
                   completion_mask, [ids for ids, _ in kept], texts, records)


def unbiased_std(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The standard deviation with Bessel's correction, computed as TRL's ``nanstd`` does (no NaNs here)."""
    mean = values.mean(dim=dim, keepdim=True) if dim is not None else values.mean()
    variance = ((values - mean) ** 2).mean(dim=dim) if dim is not None else ((values - mean) ** 2).mean()
    count = values.size(dim) if dim is not None else values.numel()
    return torch.sqrt(variance * (count / (count - 1)))


def advantages(totals: torch.Tensor, group: int, scale: str, batch_std: float | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantage per answer (N,), the reward std of each group (N / group,)) from the answers' total rewards,
    ``group`` consecutive answers per prompt. ``scale``: divide by the group's std, by ``batch_std`` (the std over
    every answer of the optimizer step, all processes), or not."""
    grouped = totals.view(-1, group)
    mean = grouped.mean(dim=1).repeat_interleave(group)
    group_std = unbiased_std(grouped, dim=1)
    centred = totals - mean
    if scale == "none":
        return centred, group_std
    std = group_std.repeat_interleave(group) if scale == "group" else torch.full_like(totals, batch_std)
    return centred / (std + STD_EPSILON), group_std


def reward_metrics(rewards: torch.Tensor, totals: torch.Tensor, group_std: torch.Tensor, names: list[str],
                   group: int) -> dict:
    """The logged reward metrics of one micro-batch as (sum, weight) pairs of host floats: means over answers
    (``reward``, ``reward/<name>``), and over groups the within-group std (``reward_std``, ``reward_std/<name>``:
    what the advantages are scaled by) and the share of groups whose answers all scored the same."""
    answers, groups = float(totals.numel()), float(group_std.numel())
    out = {"reward": (float(totals.sum()), answers), "reward_std": (float(group_std.sum()), groups),
           "zero_std_groups": (float(torch.isclose(group_std, torch.zeros_like(group_std)).sum()), groups)}
    for i, name in enumerate(names):
        column = rewards[:, i]
        out[f"reward/{name}"] = (float(column.sum()), answers)
        out[f"reward_std/{name}"] = (float(unbiased_std(column.view(-1, group), dim=1).sum()), groups)
    return out


class Timer:
    """Seconds spent in the block (host clock; generation ends with a host read, so the device is done)."""

    def __enter__(self):
        self.began = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.began


class CompletionSamples(LorafitCallback):
    """``completion_samples.jsonl`` in the run folder: at every logged training step, the answers sampled for that
    step's first prompt with their rewards (the report shows them at a few steps). The main process writes; a
    resumed run keeps the lines up to its checkpoint's step."""

    def __init__(self, run, objective):
        self.run, self.objective = run, objective

    def on_train_begin(self, loop) -> None:
        path, step = self.run.path / self.run.SAMPLES, loop.state.step
        kept = []
        if step and path.is_file():
            kept = [r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if r["step"] <= step]
        self.run.write_lines(self.run.SAMPLES, kept)

    def on_step_end(self, step: int, logs: dict) -> None:
        if "loss" in logs and self.objective.samples:
            for sample in self.objective.samples:
                self.run.append_line(self.run.SAMPLES, {"step": step, **sample})
