"""Packing is exact: a packed batch gives the loss and gradients of its examples run one by one (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch
from conftest import conversation

from lorafit.data.labels import IGNORE_INDEX, tokenize_conversation, tokenize_text
from lorafit.data.packing import PackedBins, PackedCollator, best_fit_decreasing, packed_collator, padding_fraction
from lorafit.data.sources import Example


def _examples(tokenizer) -> list[Example]:
    """Unequal lengths; some trained on every token (so an example's FIRST token is a label, the case where a
    packed row could learn to predict one example from the previous one), plain text too."""
    rows = [conversation("Repeat: " + "alpha beta " * (1 + i), "alpha " * (1 + i), system="Be brief." if i % 2 else None)
            for i in range(5)]
    tokenised = [tokenize_conversation(tokenizer, r["messages"], train_on="all" if i % 2 else "all_assistant")
                 for i, r in enumerate(rows)]
    tokenised.append(tokenize_text(tokenizer, "Lisbon is the capital of Portugal."))
    return [Example(t.input_ids, t.labels, f"row {i}", str(i)) for i, t in enumerate(tokenised)]


_MODELS: dict = {}


def _lora_model(model_dir, attn: str):
    if attn not in _MODELS:
        _MODELS[attn] = _build_lora_model(model_dir, attn)
    return _MODELS[attn]


def _build_lora_model(model_dir, attn: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                            init_lora_weights=False))  # non-zero B: gradients reach every layer
    assert model.config._attn_implementation == attn
    return model


def _loss_and_grads(model, batches: list[dict], num_items: int):
    model.zero_grad()
    total = 0.0
    for batch in batches:
        loss = model(**batch, num_items_in_batch=num_items).loss
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _targets(examples) -> int:
    return sum(sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in examples)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("packing", ["padding_free", "bfd"])
def test_packed_batch_equals_examples_one_by_one(tiny_model_dir, tiny_tokenizer, attn, packing):
    examples = _examples(tiny_tokenizer)
    model = _lora_model(tiny_model_dir, attn)
    n = _targets(examples)
    one_by_one = [{"input_ids": torch.tensor([e.input_ids]), "labels": torch.tensor([e.labels])} for e in examples]
    reference_loss, reference_grads = _loss_and_grads(model, one_by_one, n)

    if packing == "bfd":
        capacity = max(len(e.input_ids) for e in examples) + 8
        bins = PackedBins(examples, capacity)
        assert 1 < len(bins) < len(examples)  # several examples really share rows
        features = [bins[i] for i in range(len(bins))]
    else:
        features = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    batch = packed_collator(packing, attn, tiny_tokenizer.pad_token_id)(features)
    assert "attention_mask" not in batch
    if packing == "bfd":  # a row per bin for the mask-based kernels: B x L^2 attention, not (B x L)^2
        assert batch["input_ids"].shape[0] == len(features) > 1
        topped_up = sum(len(f["input_ids"]) < batch["input_ids"].shape[1] for f in features)
        assert topped_up > 0  # the pad block is its own "example": positions restart there too
    else:
        assert batch["input_ids"].shape[0] == 1
        topped_up = 0
    assert (batch["position_ids"] == 0).sum() == len(examples) + topped_up  # positions restart once per example
    # The Trainer's count of targets (labels[..., 1:]) equals the one-by-one count: no first token is a target.
    assert int(batch["labels"][..., 1:].ne(IGNORE_INDEX).sum()) == n
    packed_loss, packed_grads = _loss_and_grads(model, [batch], n)

    assert packed_loss == pytest.approx(reference_loss, rel=1e-5)
    assert packed_grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        assert grad.norm() > 0, name
        diff = (packed_grads[name] - grad).norm() / grad.norm()
        assert diff < 1e-5, f"{name}: relative gradient difference {diff:.2e}"


def test_flash_attention_and_padding_free_get_one_row_the_others_a_row_per_bin():
    features = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "position_ids": [0, 1, 2]},
                {"input_ids": [8, 9], "labels": [8, 9]}]
    assert packed_collator("bfd", "flash_attention_2", 0)(features)["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert packed_collator("padding_free", "sdpa", 0)(features)["input_ids"].shape == (1, 5)
    rows = packed_collator("bfd", "sdpa", 0)(features)
    assert rows["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert rows["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert rows["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]


def test_a_kv_cache_would_leak_across_packed_examples(tiny_model_dir, tiny_tokenizer):
    """Why packing requires use_cache=False (the recipe checks it): with a cache the examples attend to each other."""
    examples = _examples(tiny_tokenizer)[:3]
    model = _lora_model(tiny_model_dir, "sdpa")
    batch = PackedCollator()([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    with torch.no_grad():
        separate = torch.cat([model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples])
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits[0]
    assert (packed - separate).abs().max() < 1e-4
    assert (cached - separate).abs().max() > 1e-2


def test_best_fit_decreasing_respects_capacity_and_keeps_every_example():
    import random

    lengths = [random.Random(i).randint(1, 100) for i in range(500)]
    bins = best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= 1.1 * sum(lengths) / 128 + 1  # BFD is near the lower bound on this kind of data


def test_padding_fraction():
    assert padding_fraction([4, 4, 2, 2], 2, grouped=True) == 0.0
    assert padding_fraction([4, 2, 4, 2], 2, grouped=False) == pytest.approx(4 / 16)
