"""KTO (Ethayarajh et al. 2024) as a lorafit ``Objective``: single answers labelled desirable or undesirable.

With r = log pi(y|x) - log pi_ref(y|x) (answer tokens summed; the reference is the base model, adapter off) and the
reference point z = max(0, mean over mismatched pairs of r(y'|x)), per answer:

    desirable    w_d * (1 - sigmoid(beta * (r - z)))
    undesirable  w_u * (1 - sigmoid(beta * (z - r)))

z is estimated as TRL does: each prompt is paired with the previous row's answer (the answers rotated by one,
trl/trainer/kto_trainer.py: add_kl_completion_ids), scored by policy and reference without gradients, averaged over
the processes and clamped at 0. Here the pairs are made once per optimizer step (``prepare_step``) over all its
micro-batches, so z, and with it the gradients, do not depend on how the step is cut into micro-batches; with one
micro-batch per step on one process they are TRL's pairs exactly. An evaluation batch pairs within itself.

Every term is per answer: a micro-batch returns its sum over the step's answer count (``StepTotals.examples``), as
TRL's mean over the batch. Rewards (logged): beta * r of the desirable (``reward_chosen``) and undesirable
(``reward_rejected``) answers, and ``kl``, the reference point z. tests/test_kto_simpo.py checks the loss against
KTOTrainer._compute_loss on the same batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafit.data.labels import IGNORE_INDEX
from lorafit.model.supervised_head import with_positions
from lorafit.training.strategy import world_size
from lorafit.training.objectives import Objective, divide_by_count
from lorafit.training.preference import forward_answer_logps, reference_model


def mismatched_rows(rows: list[tuple[list[int], list[int], int]]) -> list[dict]:
    """Row i's prompt with row i-1's answer (row 0 with the last row's): TRL's rotation by one. ``rows``: each
    row's (input_ids, labels, answer_start), the answer being input_ids[answer_start:]."""
    out = []
    for i, (ids, _, start) in enumerate(rows):
        other_ids, other_labels, other_start = rows[i - 1]
        out.append({"input_ids": ids[:start] + other_ids[other_start:],
                    "labels": [IGNORE_INDEX] * start + other_labels[other_start:]})
    return out


class KTOObjective(Objective):
    data = "unpaired"
    metric_names = ("reward_chosen", "reward_rejected", "kl")

    def __init__(self, *, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        self.pad_token_id = 0

    def host_inputs(self, batch: dict) -> dict:
        return with_positions(batch)  # the answer positions, for forward_answer_logps

    def use_tokenizer(self, tokenizer) -> None:
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def prepare_step(self, model, batches, step):
        point = self.reference_point(model, [row for b in batches for row in b["rows"]],
                                     sizes=[len(b["rows"]) for b in batches], across_processes=True)
        return [{**b, "kl": point} for b in batches]

    def reference_point(self, model, rows: list, *, sizes: list[int], across_processes: bool) -> torch.Tensor:
        """z: the mean over the mismatched pairs of log pi - log pi_ref, every process, at least 0 (0-d, device)."""
        from lorafit.data.collate import PadCollator

        device = next(p for p in model.parameters()).device
        pairs, total, start = mismatched_rows(rows), torch.zeros((), device=device, dtype=torch.float32), 0
        with torch.no_grad():
            for size in sizes:  # scored in the micro-batches' sizes: no larger batch than training takes
                made = with_positions(PadCollator(self.pad_token_id)(pairs[start:start + size]))  # on the host
                batch = {k: v.to(device) for k, v in made.items()}
                start += size
                with reference_model(model):
                    reference, _ = forward_answer_logps(model, batch)
                policy, _ = forward_answer_logps(model, batch)
                total = total + (policy - reference).sum().to(torch.float32)
        summed = torch.stack([total, torch.tensor(float(len(pairs)), device=device)])
        if across_processes and world_size() > 1:
            torch.distributed.all_reduce(summed)  # a device collective: no host read
        return (summed[0] / summed[1].clamp(min=1)).clamp(min=0)

    def compute(self, model, batch, totals=None):
        point = batch.get("kl")
        if point is None:  # an evaluation batch: its own pairs
            point = self.reference_point(model, batch["rows"], sizes=[len(batch["rows"])], across_processes=False)
        # The reference first: after a PiSSA/OLoRA init base_view writes into the parameters (training/preference.py)
        with reference_model(model):
            reference, _ = forward_answer_logps(model, batch)
        policy, _ = forward_answer_logps(model, batch)
        ratio = policy - reference  # (n,)
        desirable = batch["desirable"].to(ratio.device)
        losses = torch.where(desirable, self.desirable_weight * (1 - F.sigmoid(self.beta * (ratio - point))),
                             self.undesirable_weight * (1 - F.sigmoid(self.beta * (point - ratio))))
        loss = divide_by_count(losses.sum(), None if totals is None else totals.examples, losses.size(0))
        rewards = self.beta * ratio.detach()
        chosen = desirable.to(rewards.dtype)
        metrics = {"reward_chosen": ((rewards * chosen).sum(), chosen.sum()),
                   "reward_rejected": ((rewards * (1 - chosen)).sum(), (1 - chosen).sum()),
                   "kl": (point.detach(), 1.0)}
        return loss, metrics
