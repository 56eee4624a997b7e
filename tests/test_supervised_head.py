"""The head on the supervised positions only (model/supervised_head.py): the supervised loss, the preference
objectives' answer log-probabilities and their gradients are those of the whole-grid logits, the head really runs
on N positions, and a head the hook cannot reach is left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafit.config import LoraConfig
from lorafit.data.labels import IGNORE_INDEX
from lorafit.model.loading import attach_lora
from lorafit.model.supervised_head import POSITIONS, head_at, supervised_positions
from lorafit.training.objectives import SupervisedObjective, StepTotals
from lorafit.training.preference import DPOObjective, answer_logps, forward_answer_logps


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.config.use_cache = False
    model = attach_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0))
    with torch.no_grad():  # B = 0 at init would leave the adapters out of the gradients compared below
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.train()


def _padded_batch() -> dict:
    """Three rows of unequal length: a prompt (unlabelled) then an answer; the third has no answer at all."""
    ids = torch.randint(3, 1000, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 7:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[0, :5] = IGNORE_INDEX  # prompt
    labels[1, :3] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX  # nothing supervised in this row
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _packed_batch() -> dict:
    """Two examples in one row (restarting position_ids, no mask), each with its own prompt."""
    ids = torch.randint(3, 1000, (1, 14), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    labels[0, 6:10] = IGNORE_INDEX  # the second example's first token and prompt
    return {"input_ids": ids, "labels": labels, "position_ids": torch.tensor([list(range(6)) + list(range(8))])}


def _whole_grid_loss(model, batch: dict, total: int) -> torch.Tensor:
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).double(), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum") / total


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("make", [_padded_batch, _packed_batch])
def test_the_loss_and_gradients_are_the_whole_grid_ones(tiny_model_dir, make):
    model = _model(tiny_model_dir)
    batch = make()
    objective = SupervisedObjective()
    total = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    reference = _whole_grid_loss(model, batch, total)
    reference.backward()
    expected = _grads(model)

    prepared = objective.host_inputs(batch)  # as the loader makes it: the positions come with the batch
    assert prepared[POSITIONS].tolist() == [i for i, t in enumerate(
        F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1).tolist()) if t != IGNORE_INDEX]
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    loss, _ = objective.compute(model, prepared, StepTotals(tokens=total, examples=len(batch["input_ids"])))
    hook.remove()
    assert shapes == [(total, model.config.vocab_size)]  # the head ran on the supervised positions only
    assert abs(loss.item() - reference.item()) <= 1e-6 * abs(reference.item())
    loss.backward()
    got = _grads(model)
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        assert torch.allclose(got[name].double(), g.double(), rtol=1e-5, atol=1e-7), name


def test_a_batch_without_positions_gets_them_from_its_labels(tiny_model_dir):
    """A plugin or a test calling compute() with a plain batch: the same loss as the loader's batch."""
    model = _model(tiny_model_dir)
    batch = _padded_batch()
    objective = SupervisedObjective()
    with torch.no_grad():
        plain = objective.compute(model, batch)[0]
        prepared = objective.compute(model, objective.host_inputs(batch))[0]
    assert plain.item() == prepared.item()


def test_a_head_the_hook_cannot_reach_is_left_alone(tiny_model_dir):
    """Hidden states that are not this batch's (B, T, H) go through the head unchanged."""
    model = _model(tiny_model_dir)
    batch = _padded_batch()
    positions = supervised_positions(batch["labels"])
    with torch.no_grad(), head_at(model, positions, (4, 12)):  # another batch's shape
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert tuple(logits.shape) == (3, 12, model.config.vocab_size)
    with torch.no_grad(), head_at(model, positions, (3, 12)):
        picked = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(picked, logits.reshape(36, -1)[positions])
    assert not model.get_output_embeddings()._forward_pre_hooks  # the hook is removed after the block


def test_answer_log_probabilities_are_the_whole_grid_ones(tiny_model_dir):
    """DPO, ORPO, SimPO and KTO score answers through forward_answer_logps: per row, the same sums and counts as
    answer_logps on the whole-grid logits, the same gradients, with the head on the answers' positions only."""
    model = _model(tiny_model_dir)
    batch = _padded_batch()  # as 2n rows would be: each row's answer labelled, its prompt not
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected, expected_tokens = answer_logps(logits, batch["labels"])
    expected.sum().backward()
    grads = _grads(model)
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    got, tokens = forward_answer_logps(model, DPOObjective().host_inputs(batch))
    hook.remove()
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert shapes == [(n, model.config.vocab_size)]
    assert torch.equal(tokens, expected_tokens) and torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert got[2].item() == 0 and tokens[2].item() == 0  # the row with no answer
    got.sum().backward()
    for name, g in _grads(model).items():
        assert torch.allclose(g, grads[name], rtol=1e-5, atol=1e-7), name
