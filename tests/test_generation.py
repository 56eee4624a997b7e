"""The one generation function stops at every end-of-turn id, on a ChatML-style model whose EOS is another token.

The model is built so its next token depends only on the current one (attention and MLP outputs are zero, so the
residual stream is the token's embedding; embeddings are one-hot and the head is a lookup table). Its reply to any
prompt is "hello <|im_end|> world world ...": a generator that stops only at EOS (<|endoftext|>) writes past the
end of its turn.
"""

from __future__ import annotations

import pytest
import torch

from lorafit.evaluate.examples import EvalExample
from lorafit.evaluate.generate import generate_replies, stop_token_ids
from lorafit.evaluate.scoring import GenerationSettings, generation_metrics

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "say", "hi", "hello", "world"]
# next token after each token; everything else leads to "world"
NEXT = {"assistant": "hello", "hello": "<|im_end|>", "<|im_end|>": "world"}


def chatml_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="world"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHATML)


def lookup_model(tokenizer):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    size = len(VOCAB)
    config = LlamaConfig(vocab_size=size, hidden_size=size, intermediate_size=size, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    ids = tokenizer.convert_tokens_to_ids
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(size))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(size, size)
        for token in VOCAB:
            head[ids(NEXT.get(token, "world")), ids(token)] = 1.0
        model.lm_head.weight.copy_(head)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model


@pytest.fixture(scope="module")
def chatml():
    tokenizer = chatml_tokenizer()
    return lookup_model(tokenizer), tokenizer


def test_the_template_end_of_turn_token_is_a_stop_id(chatml):
    model, tokenizer = chatml
    im_end, eos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id
    assert stop_token_ids(tokenizer, model.generation_config) == [eos, im_end]


def test_generation_stops_at_im_end_not_only_at_eos(chatml):
    model, tokenizer = chatml
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    conversations = [[{"role": "user", "content": "say hi"}], [{"role": "system", "content": "hi"},
                                                               {"role": "user", "content": "hi hi hi"}]]
    replies = generate_replies(model, tokenizer, conversations, max_new_tokens=8, batch_size=2)
    assert [(r.text, r.token_ids, r.stopped_at_end_of_turn) for r in replies] == [
        ("hello", [tokenizer.convert_tokens_to_ids("hello"), im_end], True)] * 2
    # Stopping at EOS alone (what eval did before) runs past the turn's end into text the model invents.
    unstopped = generate_replies(model, tokenizer, conversations[:1], max_new_tokens=5, stop_ids=[tokenizer.eos_token_id])
    assert unstopped[0].text == "hello world world world" and not unstopped[0].stopped_at_end_of_turn


def test_eval_answers_end_at_the_turn(chatml):
    """The eval path (generation metrics during training, `lorafit eval`) answers through the same function."""
    model, tokenizer = chatml
    example = EvalExample(prompt=({"role": "user", "content": "say hi"},), reference="hello", source="s", where="x:1")
    aggregated, rows = generation_metrics(model, tokenizer, [example],
                                          GenerationSettings(metrics=("exact_match",), max_new_tokens=6))
    assert rows[0]["prediction"] == "hello" and aggregated["exact_match"]["value"] == 1.0
