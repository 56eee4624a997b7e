"""`lorafit export gguf`: a llama.cpp LoRA adapter file, read back with gguf's own reader and compared tensor by
tensor with the safetensors adapter (names, numpy shapes [r, in] / [out, r], values, q/k row order, alpha)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_serving import peft_adapter, tiny_base
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.errors import LorafitError
from lorafit.export.gguf import export_gguf, permute_rows

gguf = pytest.importorskip("gguf")


def _read(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {t.name: np.asarray(t.data) for t in reader.tensors}


def test_llama_adapter_round_trips_through_ggufs_reader(tmp_path):
    base, adapter = peft_adapter(tmp_path)
    out = tmp_path / "adapter.gguf"
    written = export_gguf(adapter, out)
    fields, tensors = _read(out)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    assert written["pairs"] == 14 and written["permuted"] == 4  # q and k of 2 layers
    assert len(tensors) == 28 and "blk.1.ffn_down.weight.lora_b" in tensors and "blk.0.attn_output.weight.lora_a" in tensors
    weights = load_file(adapter / "adapter_model.safetensors")
    peft_name = "base_model.model.model.layers.{}.{}.lora_{}.weight"
    for layer in (0, 1):
        for module, gguf_name, heads in (("self_attn.q_proj", "attn_q", 4), ("self_attn.k_proj", "attn_k", 2),
                                         ("self_attn.v_proj", "attn_v", None), ("mlp.down_proj", "ffn_down", None)):
            a = weights[peft_name.format(layer, module, "A")]
            b = weights[peft_name.format(layer, module, "B")]
            got_a = tensors[f"blk.{layer}.{gguf_name}.weight.lora_a"]
            got_b = tensors[f"blk.{layer}.{gguf_name}.weight.lora_b"]
            assert got_a.shape == (4, a.shape[1]) and got_b.shape == (b.shape[0], 4)  # [r, in] and [out, r]
            np.testing.assert_array_equal(got_a, a.numpy())
            expected_b = permute_rows(b, heads).numpy() if heads else b.numpy()
            np.testing.assert_array_equal(got_b, expected_b)
            if heads:
                assert not np.array_equal(got_b, b.numpy())  # the rows really moved
                # The delta llama.cpp applies is the converter's permutation of the full delta B @ A.
                np.testing.assert_allclose(got_b @ got_a, permute_rows(b @ a, heads).numpy(), atol=1e-6)


def test_ggml_dimensions_pass_llama_cpps_shape_check(tmp_path):
    # llama-adapter.cpp: model->ne[0] == a->ne[0] (in), model->ne[1] == b->ne[1] (out), a->ne[1] == b->ne[0] (r);
    # ggml's ne lists dimensions fastest first, the reverse of numpy's order. Its F32 type id is 0.
    _, adapter = peft_adapter(tmp_path)
    export_gguf(adapter, tmp_path / "a.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors}
    a, b = tensors["blk.0.ffn_down.weight.lora_a"], tensors["blk.0.ffn_down.weight.lora_b"]
    assert list(a.shape) == [64, 4] and list(b.shape) == [4, 32]  # down_proj: in 64 (intermediate), out 32, r 4
    assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32


def test_permute_rows_is_llama_cpps_rotary_pairing():
    # 1 head of dimension 4: HF pairs rows (0, 2) and (1, 3); llama.cpp wants the pairs adjacent: 0, 2, 1, 3.
    rows = torch.arange(4.0).reshape(4, 1)
    assert permute_rows(rows, 1).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]


def _rotary(q: torch.Tensor, position: int, pairs: str) -> torch.Tensor:
    """Rotary embedding of one head vector: Hugging Face pairs dimensions (i, i + d/2) (rotate_half), llama.cpp's
    llama architecture (rope type "norm") pairs (2i, 2i + 1)."""
    half = q.shape[0] // 2
    angle = position * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    cos, sin = torch.cos(angle), torch.sin(angle)
    if pairs == "hf":
        a, b = q[:half], q[half:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin])
    a, b = q[0::2], q[1::2]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=1).flatten()


def test_permuted_rows_give_llama_cpps_rotary_the_attention_scores_of_the_hf_model():
    # Why lora_B's q/k rows are permuted: with them, llama.cpp's adjacent-pair rotary embedding produces the same
    # query-key scores as Hugging Face's half-split one on the unpermuted weights.
    torch.manual_seed(0)
    heads, dim, hidden = 2, 8, 16
    wq, wk = torch.randn(heads * dim, hidden, dtype=torch.float64), torch.randn(heads * dim, hidden, dtype=torch.float64)
    x1, x2 = torch.randn(hidden, dtype=torch.float64), torch.randn(hidden, dtype=torch.float64)
    for head in range(heads):
        rows = slice(head * dim, (head + 1) * dim)
        hf = _rotary((wq @ x1)[rows], 3, "hf") @ _rotary((wk @ x2)[rows], 7, "hf")
        cpp = _rotary((permute_rows(wq, heads) @ x1)[rows], 3, "cpp") @ _rotary((permute_rows(wk, heads) @ x2)[rows], 7, "cpp")
        unpermuted = _rotary((wq @ x1)[rows], 3, "cpp") @ _rotary((wk @ x2)[rows], 7, "cpp")
        assert cpp.item() == pytest.approx(hf.item(), rel=1e-9) and unpermuted.item() != pytest.approx(hf.item(), rel=1e-3)


def test_mistral_maps_like_llama_and_qwen2_keeps_its_row_order(tmp_path):
    _, adapter = peft_adapter(tmp_path / "m", "mistral")
    assert export_gguf(adapter, tmp_path / "m.gguf")["permuted"] == 4
    assert _read(tmp_path / "m.gguf")[0]["general.architecture"] == "llama"
    _, adapter = peft_adapter(tmp_path / "q", "qwen2")
    written = export_gguf(adapter, tmp_path / "q.gguf")
    fields, tensors = _read(tmp_path / "q.gguf")
    assert fields["general.architecture"] == "qwen2" and written["permuted"] == 0
    b = load_file(adapter / "adapter_model.safetensors")["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight.lora_b"], b.numpy())


def test_rslora_with_one_rank_writes_the_alpha_that_gives_peft_s_scale(tmp_path):
    _, adapter = peft_adapter(tmp_path, use_rslora=True, r=4, lora_alpha=8)
    export_gguf(adapter, tmp_path / "rs.gguf")
    alpha = _read(tmp_path / "rs.gguf")[0]["adapter.lora.alpha"]
    assert math.isclose(alpha / 4, 8 / math.sqrt(4), rel_tol=1e-6)  # llama.cpp alpha/r == peft alpha/sqrt(r)


@pytest.mark.parametrize("lora, message", [
    ({"use_dora": True}, "use_dora is true"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "bias is 'lora_only'"),
    ({"use_rslora": True, "rank_pattern": {"q_proj": 8}}, "use_rslora with ranks [4, 8]"),
    ({"alpha_pattern": {"q_proj": 32}}, "alpha_pattern"),
    ({"target_modules": ["q_proj", "lm_head"]}, "module lm_head has no llama.cpp adapter tensor"),
])
def test_what_the_format_cannot_hold_is_refused_and_nothing_is_written(tmp_path, lora, message):
    _, adapter = peft_adapter(tmp_path, **lora)
    with pytest.raises(LorafitError, match=re.escape(message)):
        export_gguf(adapter, tmp_path / "x.gguf")
    assert [p.name for p in tmp_path.iterdir() if "gguf" in p.name] == []


def test_rank_pattern_without_rslora_is_exact_with_one_alpha(tmp_path):
    _, adapter = peft_adapter(tmp_path, rank_pattern={"q_proj": 8})
    written = export_gguf(adapter, tmp_path / "rp.gguf")
    assert written["ranks"] == [4, 8] and written["alpha"] == 8.0  # llama.cpp divides by each tensor's own rank


def test_a_gpt2_base_is_refused_with_the_supported_list(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_base(tmp_path / "gpt2", "gpt2")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["c_attn"],
                   fan_in_fan_out=True)).save_pretrained(tmp_path / "adapter")
    with pytest.raises(LorafitError, match="(?s)GPT2LMHeadModel is not supported.*LlamaForCausalLM"):
        export_gguf(tmp_path / "adapter", tmp_path / "x.gguf")


def test_cli_export_gguf(tmp_path):
    _, adapter = peft_adapter(tmp_path)
    out = tmp_path / "cli.gguf"
    run = CliRunner().invoke
    result = run(app, ["export", "gguf", str(adapter), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "llama" in result.output and out.is_file()
    stages = [line.split("] ", 1)[1] for line in result.stderr.splitlines() if line.startswith("[")]
    assert stages == [f"verifying {adapter.resolve()}", "converting the LoRA tensors for llama.cpp (llama)",
                      f"writing 14 tensor pairs to {out}"]  # progress on stderr (evaluate/progress.py)
    again = run(app, ["export", "gguf", str(adapter), "--out", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output and "Traceback" not in again.output
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    refused = run(app, ["export", "gguf", str(adapter), "--out", str(tmp_path / "dora.gguf")])
    assert refused.exit_code == 1 and "use_dora" in refused.output and not (tmp_path / "dora.gguf").exists()
