"""`lorafit verify --serving vllm`: each thing vLLM's LoRA loader refuses is warned about, on real small PEFT
adapters (a 2-layer Llama, and Qwen2 for biases); a clean adapter gets no warning; the exit code never changes."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

from lorafit.artifact.serving import serving_warnings, vllm_flag_for_rank
from lorafit.cli import app

BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_base(folder, kind: str = "llama"):
    """A 2-layer base with grouped-query attention (4 query heads, 2 key/value heads)."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(0)
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    model = {"llama": lambda: LlamaForCausalLM(LlamaConfig(**shape)),
             "mistral": lambda: MistralForCausalLM(MistralConfig(**shape)),
             "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**shape)),
             "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32))}[kind]()
    model.save_pretrained(folder)
    return folder


def peft_adapter(tmp_path, kind: str = "llama", **lora):
    """A PEFT adapter with non-zero A and B (init_lora_weights=False) on every linear layer of the blocks."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_base(tmp_path / kind, kind)
    settings = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=BLOCK_LINEARS)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**{**settings, **lora}))
    # Without save_embedding_layers=False peft also saves an embedding's full base weight when one is targeted.
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    return base, tmp_path / "adapter"


def test_a_plain_lora_of_rank_16_has_nothing_to_warn_about(tmp_path):
    _, adapter = peft_adapter(tmp_path, r=16, use_rslora=True)  # rsLoRA: vLLM scales it as peft does
    assert serving_warnings(adapter) == []


@pytest.mark.parametrize("lora, expected", [
    ({"use_dora": True}, r"^use_dora: vLLM does not serve DoRA"),
    ({"modules_to_save": ["lm_head"]}, r"^modules_to_save \['lm_head'\]: vLLM refuses"),
    ({"r": 32}, r"^rank 32: above vLLM's default max_lora_rank 16; start vLLM with --max-lora-rank 32"),
    ({"r": 40}, r"^rank 40: .*--max-lora-rank 64"),
    ({"r": 520}, r"^rank 520: above the largest max_lora_rank vLLM accepts \(512\)"),
    ({"target_modules": ["q_proj", "embed_tokens", "lm_head"]}, r"^target modules lm_head, model.embed_tokens: vLLM serves"),
    ({"rank_pattern": {"q_proj": 8}}, r"^rank_pattern \{'q_proj': 8\}: vLLM reads one r"),
    ({"alpha_pattern": {"q_proj": 32}}, r"^alpha_pattern"),
])
def test_each_thing_vllm_refuses_is_one_warning(tmp_path, lora, expected):
    _, adapter = peft_adapter(tmp_path, **lora)
    warnings = serving_warnings(adapter)
    assert len(warnings) == 1 and re.search(expected, warnings[0]), warnings


def test_trained_biases_are_warned_about(tmp_path):
    _, adapter = peft_adapter(tmp_path, "qwen2", bias="lora_only")  # Qwen2's q/k/v projections have biases
    assert any(w.startswith("bias 'lora_only': vLLM does not load adapter biases") for w in serving_warnings(adapter))


def test_rank_flag_is_the_smallest_accepted_value():
    assert [vllm_flag_for_rank(r) for r in (1, 2, 8, 16, 17, 300, 321, 512, 513)] == [1, 8, 8, 16, 32, 320, 512, 512, None]


def test_cli_prints_the_warnings_and_keeps_the_exit_code(tmp_path):
    _, adapter = peft_adapter(tmp_path, use_dora=True, r=64)
    run = CliRunner().invoke
    plain = run(app, ["verify", str(adapter)])
    served = run(app, ["verify", str(adapter), "--serving", "vllm"])
    assert plain.exit_code == served.exit_code == 3  # a PEFT adapter: no checksums.json, integrity not proven
    assert "vllm: use_dora" not in plain.output
    assert "warning: vllm: use_dora" in served.output and "--max-lora-rank 64" in served.output
    as_json = run(app, ["verify", str(adapter), "--serving", "vllm", "--json"])
    assert '"vllm: rank 64' in as_json.output and as_json.exit_code == 3
    unknown = run(app, ["verify", str(adapter), "--serving", "tgi"])
    assert unknown.exit_code == 1 and "--serving tgi: unknown" in unknown.output and "vllm" in unknown.output
