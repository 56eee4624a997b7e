"""Objectives on the tiny model and a fixed batch: the contrastive loss against the formula computed by hand from
separate forward passes, its gradients, gradient-accumulation normalisation, metrics, and the SFT objective."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import write_jsonl
from lorafit.config import DataSource
from lorafit.data.labels import IGNORE_INDEX
from lorafit.data.sample_triplets import generate_triplets
from lorafit.data.triplets import TripletCollator, read_triplets, tokenise_triplet
from lorafit.errors import LorafitError
from lorafit.training.objectives import ContrastiveObjective, StepTotals, SupervisedObjective, pool

LAMBDAS = {"lambda_causal": 0.7, "lambda_spurious": 1.3, "lambda_task": 0.5, "temperature": 0.07}


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    """The tiny model in float64 (so separate and batched passes agree far below 1e-6) with a LoRA adapter whose
    B matrices are random, so every adapter tensor gets a gradient."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                            init_lora_weights=False))
    model.train()
    return model


@pytest.fixture(scope="module")
def triplets(tmp_path_factory, tiny_tokenizer):
    """Four triplets whose parts and answers all have different lengths."""
    rows, _ = generate_triplets(n_train=4, n_eval=0, seed=7)
    for i, row in enumerate(rows):
        row["target"] += " Done." * i  # the sample answers can tokenise to equal lengths
    path = write_jsonl(tmp_path_factory.mktemp("triplets") / "t.jsonl", rows)
    records, _, _ = read_triplets(DataSource(path=str(path)))
    return [tokenise_triplet(tiny_tokenizer, r) for r in records]


def _collate(examples, tokenizer):
    return TripletCollator(tokenizer.pad_token_id)([e.as_features() for e in examples])


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def _hand_loss(model, examples, *, layer, pooling, lambda_causal, lambda_spurious, lambda_task, temperature):
    """The formula, one example and one part at a time (3n forward passes, no padding anywhere)."""

    def hidden(ids):
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
        return out.hidden_states[layer][0], out.logits[0]

    def represent(h, prompt):
        return h[prompt - 1] if pooling == "last_token" else h[:prompt].sum(0) / prompt

    def cos(a, b):
        return (a @ b) / (a.norm() * b.norm())

    causal, spurious, ce_sum, ce_count, stabilities, similarities = 0.0, 0.0, 0.0, 0, [], []
    for e in examples:
        h_b, logits = hidden(e.input_ids)
        b = represent(h_b, e.benign_prompt)
        cf = represent(hidden(e.cf_ids)[0], len(e.cf_ids))
        inj = represent(hidden(e.injection_ids)[0], len(e.injection_ids))
        stabilities.append(cos(b, cf))
        similarities.append(cos(b, inj))
        causal = causal - cos(b, cf) / temperature
        spurious = spurious + cos(b, inj) / temperature
        for t in range(len(e.labels) - 1):
            if e.labels[t + 1] != IGNORE_INDEX:
                ce_sum = ce_sum - torch.log_softmax(logits[t], -1)[e.labels[t + 1]]
                ce_count += 1
    n = len(examples)
    loss = lambda_causal * causal / n + lambda_spurious * spurious / n + lambda_task * ce_sum / ce_count
    stability, similarity = (float(sum(stabilities).detach()) / n, float(sum(similarities).detach()) / n)
    return loss, {"causal_stability": stability, "spurious_separation": 1 - similarity,
                  "causal_discrimination": stability - similarity, "task_loss": float(ce_sum.detach()) / ce_count}


@pytest.mark.parametrize("pooling, layer", [("last_token", -1), ("mean", -1), ("last_token", 2)])
def test_contrastive_loss_and_gradients_equal_the_formula_over_separate_passes(lora_model, triplets, tiny_tokenizer,
                                                                              pooling, layer):
    objective = ContrastiveObjective(**LAMBDAS, layer=layer, pooling=pooling)
    batch = _collate(triplets, tiny_tokenizer)
    loss, metrics = objective.compute(lora_model, batch)
    loss.backward()
    batched = _grads(lora_model)

    expected, expected_metrics = _hand_loss(lora_model, triplets, layer=layer, pooling=pooling, **LAMBDAS)
    expected.backward()
    separate = _grads(lora_model)

    assert abs(loss.item() - expected.item()) < 1e-6
    assert metrics == pytest.approx(expected_metrics, abs=1e-6)
    assert len(batched) == len(separate) > 0
    worst = max((batched[n] - separate[n]).abs().max().item() for n in batched)
    assert worst < 1e-6
    assert all(g.abs().sum() > 0 for g in batched.values())  # every adapter tensor is trained by this loss


def test_one_forward_pass_of_3n_rows(lora_model, triplets, tiny_tokenizer):
    calls = []
    handle = lora_model.get_base_model().register_forward_hook(lambda m, args, kwargs_out: calls.append(1))
    try:
        ContrastiveObjective(**LAMBDAS).compute(lora_model, _collate(triplets, tiny_tokenizer))
    finally:
        handle.remove()
    assert len(calls) == 1


def test_accumulated_micro_batches_add_up_to_the_full_batch(lora_model, triplets, tiny_tokenizer):
    """batch 4 x accumulation 1 == batch 1 x accumulation 4 (and 2 x 2): per-example terms are divided by the
    step's triplet count, per-token CE by the step's supervised token count."""
    objective = ContrastiveObjective(**LAMBDAS)
    full_loss, _ = objective.compute(lora_model, _collate(triplets, tiny_tokenizer))
    full_loss.backward()
    full = _grads(lora_model)
    tokens = sum(sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in triplets)
    assert len({e.num_supervised for e in triplets}) > 1  # unequal answers: a per-micro-batch mean would differ

    for size in (1, 2):
        total = 0.0
        for start in range(0, 4, size):
            micro = _collate(triplets[start:start + size], tiny_tokenizer)
            loss, _ = objective.compute(lora_model, micro, StepTotals(tokens=torch.tensor(tokens), examples=4))
            loss.backward()
            total += loss.item()
        accumulated = _grads(lora_model)
        assert total == pytest.approx(full_loss.item(), abs=1e-9)
        assert max((accumulated[n] - full[n]).abs().max().item() for n in full) < 1e-9

    # The same split normalised per micro-batch (mean of means) is measurably different: the check can fail.
    naive = sum(objective.compute(lora_model, _collate([e], tiny_tokenizer))[0].item() for e in triplets) / 4
    assert abs(naive - full_loss.item()) > 1e-4


def test_metrics_move_the_right_way_for_identical_and_different_inputs(lora_model, triplets, tiny_tokenizer):
    e = triplets[0]
    same = type(e)(e.input_ids, e.labels, e.benign_prompt, e.input_ids[: e.benign_prompt],
                   e.input_ids[: e.benign_prompt], e.where, e.identity)
    _, metrics = ContrastiveObjective(**LAMBDAS).compute(lora_model, _collate([same], tiny_tokenizer))
    assert metrics["causal_stability"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["spurious_separation"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["causal_discrimination"] == pytest.approx(0.0, abs=1e-9)
    assert math.isfinite(metrics["task_loss"]) and metrics["task_loss"] > 0


def test_pooling_by_hand():
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)  # (B=2, T=3, H=4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert pool(hidden, mask, "last_token").tolist() == [hidden[0, 1].tolist(), hidden[1, 0].tolist()]
    assert pool(hidden, mask, "mean").tolist() == [((hidden[0, 0] + hidden[0, 1]) / 2).tolist(), hidden[1, 0].tolist()]


def test_a_layer_the_model_lacks_is_a_clear_error(lora_model, triplets, tiny_tokenizer):
    with pytest.raises(LorafitError, match=r"objective.layer: 9 is out of range: the model has 4 layers"):
        ContrastiveObjective(layer=9).compute(lora_model, _collate(triplets[:1], tiny_tokenizer))


def test_supervised_objective_is_the_models_own_loss(lora_model, tiny_tokenizer, triplets):
    from lorafit.data.collate import PadCollator

    batch = PadCollator(tiny_tokenizer.pad_token_id)([{"input_ids": e.input_ids, "labels": e.labels} for e in triplets])
    tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    loss, metrics = SupervisedObjective().compute(lora_model, batch, StepTotals(tokens=tokens * 2, examples=8))
    reference = lora_model(**batch).loss  # mean over this batch's supervised tokens
    assert metrics == {}
    assert loss.item() == pytest.approx(reference.item() / 2, abs=1e-9)  # divided by the whole step's tokens


def test_metric_means_are_weighted_by_examples_and_survive_a_checkpoint():
    from lorafit.training.window import LogWindow, MetricSums

    means = MetricSums()
    means.add_means({"causal_stability": torch.tensor(1.0)}, lambda name: 3)
    saved = means.state_dict()
    restored = MetricSums()
    restored.load_state_dict(saved)
    for m in (means, restored):
        m.add_means({"causal_stability": 0.0}, lambda name: 1)
        assert m.read()[0] == {"causal_stability": 0.75}
        assert m.read()[0] == {}
    # a (sum, weight) pair is taken as it is: the contrastive task loss is a mean over tokens, not examples
    means.add_means({"task_loss": (torch.tensor(6.0), torch.tensor(3.0))}, lambda name: 99)
    assert means.read()[0] == {"task_loss": 2.0}
    window = LogWindow()
    window.add_step(torch.tensor(2.0))
    window.metrics.add_means({"task_loss": 2.0}, lambda name: 1)
    window.add_step(torch.tensor(4.0))
    assert window.read()[0] == {"task_loss": 2.0, "loss": 3.0}  # the mean of the window's step losses
    assert window.read()[0] == {}  # the window restarts after each log


def test_gradient_checkpointing_gives_the_same_contrastive_gradients(tiny_model_dir, triplets, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                init_lora_weights=False))
        model.train()
        loss, _ = ContrastiveObjective(**LAMBDAS).compute(model, _collate(triplets, tiny_tokenizer))
        loss.backward()
        grads.append(_grads(model))
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys()
    assert max((plain[n] - checkpointed[n]).abs().max().item() for n in plain) < 1e-9
