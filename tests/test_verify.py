"""`lorafit verify` on the forms adapters really take: peft's full-path target_modules (lorafit's own artifact of a
2-layer model), a regex target, GPT-2's Conv1D layers (weights stored [in, out]) and a PEFT adapter without
checksums.json (checked, but integrity not proven: a distinct outcome and exit code)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import conversation, write_jsonl
from typer.testing import CliRunner

from lorafit import load_config, train
from lorafit.artifact.verify import is_targeted, verify_artifact
from lorafit.cli import app


@pytest.fixture(scope="module")
def two_layer_model(tmp_path_factory):
    """The tiny model's tokenizer on a 2-layer Llama: 14 linear modules, fewer than the 20 at which peft shortens
    full module paths to leaf names, so adapter_config.json keeps the full paths."""
    from lorafit.model.tiny import TINY_ARCH, build_model, build_tokenizer

    folder = tmp_path_factory.mktemp("two-layer")
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    two = type(model)(type(model.config)(**{**model.config.to_dict(), "num_hidden_layers": 2}))
    assert TINY_ARCH["num_hidden_layers"] != 2
    two.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def full_path_artifact(tmp_path_factory, two_layer_model):
    tmp = tmp_path_factory.mktemp("fullpath")
    data = write_jsonl(tmp / "train.jsonl", [conversation(f"Say {w}", w) for w in ("red", "blue", "green", "black")])
    return train(load_config({
        "model": {"path": str(two_layer_model)},
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"train": [{"path": str(data)}], "max_seq_length": 64},
        "train": {"output_dir": str(tmp / "run"), "max_steps": 2, "batch_size": 4, "seed": 1},
        "eval": {"every": None, "at_start": False, "generate_samples": 0},
    }))


def test_lorafits_own_artifact_with_full_module_paths_verifies(full_path_artifact, two_layer_model):
    artifact = full_path_artifact.adapter_dir
    targets = json.loads((artifact / "adapter_config.json").read_text())["target_modules"]
    assert "model.layers.0.self_attn.q_proj" in targets and len(targets) == 14  # what peft wrote: full paths
    report = verify_artifact(artifact, two_layer_model)
    assert report.problems == [] and report.status == "ok"
    assert report.checked["tensors"] == 28 and report.checked["base_modules"] == 14
    # the run folder stands for its artifact
    assert verify_artifact(full_path_artifact.run_dir).artifact == str(artifact)


def test_target_modules_in_every_form_peft_writes():
    module = "model.layers.0.self_attn.q_proj"
    assert is_targeted(module, ["q_proj"]) and is_targeted(module, [module]) and is_targeted(module, ["self_attn.q_proj"])
    assert not is_targeted(module, ["k_proj"]) and not is_targeted(module, ["proj"])  # whole name parts only
    assert is_targeted(module, r".*\.(q_proj|v_proj)") and not is_targeted(module, r".*\.v_proj")
    assert is_targeted(module, "all-linear")


def _gpt2_base_and_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))
    base.save_pretrained(tmp_path / "gpt2")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False,
                                            fan_in_fan_out=True))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "gpt2", tmp_path / "adapter"


def test_gpt2_conv1d_shapes_are_read_as_in_out(tmp_path):
    base, adapter = _gpt2_base_and_adapter(tmp_path)
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    report = verify_artifact(adapter, base)
    assert report.problems == [] and report.checked["base_modules"] == 4
    # A real mismatch is still found: a base with other widths.
    config = json.loads((base / "config.json").read_text())
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(**{**config, "n_embd": 16})).save_pretrained(tmp_path / "narrow")
    problems = verify_artifact(adapter, tmp_path / "narrow").problems
    assert any("transformer.h.0.attn.c_attn.weight is [16, 48], the adapter expects [32, 96]" in p for p in problems)


def test_a_peft_adapter_without_checksums_is_checked_but_not_proven(tmp_path):
    base, adapter = _gpt2_base_and_adapter(tmp_path)
    report = verify_artifact(adapter, base)
    assert report.status == "unproven" and not report.ok and report.problems == []
    assert report.checked == {"tensors": 8, "base_modules": 4} and "no checksums.json" in report.unproven[0]

    done = CliRunner().invoke(app, ["verify", str(adapter), "--base", str(base)])
    assert done.exit_code == 3, done.output
    lines = done.stdout.splitlines()
    assert lines[0] == f"PASSED, INTEGRITY NOT PROVEN {adapter}"
    assert lines[1].startswith("  passed: 8 tensors, 4 base modules") and "shapes vs the base" in lines[1]
    assert lines[2].startswith("  not proven: no checksums.json")
    as_json = json.loads(CliRunner().invoke(app, ["verify", str(adapter), "--json"]).stdout)
    assert as_json["status"] == "unproven" and as_json["ok"] is False

    # A broken tensor still fails outright, checksums or not.
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    next(iter(tensors.values())).view(-1)[0] = float("inf")
    save_file(tensors, adapter / "adapter_model.safetensors")
    failed = CliRunner().invoke(app, ["verify", str(adapter)])
    assert failed.exit_code == 1 and "non-finite" in failed.output


def test_a_sequence_classification_adapter_is_named_by_its_task_type(tmp_path, tiny_model_dir):
    """Before: "adapter tensor base_model.model.score.weight: not a LoRA or modules_to_save tensor". Now the task
    type, as eval, merge and generate name it (model/adapters.py: check_causal_lm)."""
    from test_adapters import _peft_adapter

    folder = _peft_adapter(tmp_path / "cls", tiny_model_dir, task_type="SEQ_CLS")
    report = verify_artifact(folder)
    assert report.status == "failed" and len(report.problems) == 1
    assert report.problems[0].startswith(f"{folder / 'adapter_config.json'}: task_type is 'SEQ_CLS', not CAUSAL_LM: ")
    assert "score" in report.problems[0] and "not a LoRA" not in report.problems[0]
    done = CliRunner().invoke(app, ["verify", str(folder)])
    assert done.exit_code == 1 and "task_type is 'SEQ_CLS', not CAUSAL_LM" in done.stderr
    assert "not a LoRA or modules_to_save tensor" not in done.output
