"""The embedded tiny model's constructed parts (model/tiny_weights.py) do what the quickstart relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.data.sample import CITIES, FIRST_NAMES, JOBS
from lorafit.model.tiny import build_model, build_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer(0)
    model = build_model(tokenizer, 0).eval().requires_grad_(False)
    model.config._attn_implementation = "eager"  # attention weights are returned by the eager kernel only
    return model, tokenizer


def test_previous_token_heads_attend_to_the_previous_position(tiny):
    model, tokenizer = tiny
    text = "Meet Tara Rossi, 19, a librarian from Berlin. The quick brown fox jumps over the lazy dog, twice over."
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    for layer in (0, 1):
        head = attentions[layer][0, 0]  # (query, key)
        rows = torch.arange(1, ids.shape[1])
        assert torch.equal(head[rows].argmax(-1), rows - 1), f"layer {layer}"
        weights = head[rows, rows - 1]  # POSITION_SHARPNESS 4: ~95% on the previous position
        assert float(weights.min()) > 0.8 and float(weights.mean()) > 0.9, f"layer {layer}: {weights}"
        other = attentions[layer][0, 1]  # the other heads are left random: spread, not a previous-token head
        assert not torch.equal(other[rows].argmax(-1), rows - 1)


def test_the_copy_path_predicts_the_word_attended_to(tiny):
    """Last layer value (identity) then output (the head's rotation): a copied word is that word's top logit,
    with or without its leading space (sentence ``ĠLisbon`` -> answer ``Lisbon``)."""
    model, tokenizer = tiny
    last = model.model.layers[-1].self_attn
    words = [*FIRST_NAMES[:5], *CITIES[:5], *JOBS[:5]]
    for word in words:
        spaced = tokenizer.convert_tokens_to_ids("Ġ" + word)
        plain = tokenizer.convert_tokens_to_ids(word)
        assert spaced != tokenizer.unk_token_id and plain != tokenizer.unk_token_id, word
        state = model.model.embed_tokens.weight[spaced]
        with torch.no_grad():
            logits = model.lm_head(last.o_proj(last.v_proj(state)))
        assert set(logits.topk(2).indices.tolist()) == {spaced, plain}, word
        # without the copy path, the current token is NOT what the head predicts: the residual stream is unrotated
        assert int(model.lm_head(state).argmax()) not in (spaced, plain), word


def test_words_of_one_kind_lie_near_each_other(tiny):
    model, tokenizer = tiny
    embed = model.model.embed_tokens.weight.detach()

    def vector(word):
        return embed[tokenizer.convert_tokens_to_ids("Ġ" + word)]

    def cosine(a, b):
        return float(torch.nn.functional.cosine_similarity(vector(a), vector(b), dim=0))

    # every spaced token shares the bias and space directions, so compare averages, not single pairs
    same_kind = sum(cosine(a, b) for a, b in zip(CITIES, CITIES[1:])) / (len(CITIES) - 1)
    other_kind = sum(cosine(a, b) for a, b in zip(CITIES, JOBS)) / len(JOBS)
    assert same_kind > other_kind + 0.08, (same_kind, other_kind)


def test_the_random_variant_is_the_same_architecture_all_random(tmp_path, monkeypatch):
    """``lorafit:tiny-random`` (the contrastive example's base) resolves to the all-random weights, in its own cache
    folder; ``lorafit:tiny`` to the constructed ones."""
    from lorafit.config import ModelConfig
    from lorafit.model.loading import resolve_model_path

    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path))
    random_dir = Path(resolve_model_path(ModelConfig(path="lorafit:tiny-random")))
    constructed_dir = Path(resolve_model_path(ModelConfig(path="lorafit:tiny")))
    assert (random_dir.name, constructed_dir.name) == ("tiny-llama-random-seed0", "tiny-llama-v2-seed0")
    random_weights = load_file(random_dir / "model.safetensors")
    constructed_weights = load_file(constructed_dir / "model.safetensors")
    expected = build_model(build_tokenizer(0), 0, constructed=False).state_dict()
    name = "model.embed_tokens.weight"
    assert torch.equal(random_weights[name], expected[name])
    assert not torch.equal(constructed_weights[name], expected[name])
    # the layers the construction leaves alone are the same random draw in both
    untouched = "model.layers.2.mlp.down_proj.weight"
    assert torch.equal(random_weights[untouched], constructed_weights[untouched])
