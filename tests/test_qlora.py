"""QLoRA and precision on CPU with real bitsandbytes: 4-bit NF4 and 8-bit bases train, evaluation leaves training
untouched, gradient checkpointing changes memory and not gradients."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from conftest import conversation, write_jsonl
from safetensors.torch import load_file

from lorafit import load_config, train
from lorafit.errors import LorafitError

# Only the tests that quantize need bitsandbytes; the others (missing-package error, fp16 refusal, gradient
# checkpointing) run everywhere, so they are marked one by one instead of skipping the whole module.
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes not installed (pip install 'lorafit[qlora]')")

WORDS = "red blue green black white pink gray gold".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qlora-data")
    rows = [conversation(f"Say {w}", f"{w} {w}") for w in WORDS]
    return write_jsonl(folder / "train.jsonl", rows), write_jsonl(folder / "eval.jsonl", rows[:4])


def _config(out, model_dir, data, quant, every=None, **train):
    return load_config({
        "model": {"path": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "quant": quant,
        "data": {"train": [{"path": str(data[0])}], "eval": [{"path": str(data[1])}], "max_seq_length": 64},
        "train": {"output_dir": str(out), "max_steps": 30, "batch_size": 4, "learning_rate": 3e-3, "log_every": 1,
                  "seed": 3, **train},
        "eval": {"every": every, "at_start": every is not None},
    })


def _losses(result) -> list[float]:
    rows = [json.loads(line) for line in (result.run_dir / "metrics_history.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


NF4 = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "fp32"}


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory, tiny_model_dir, data):
    """30 steps of 4-bit NF4 QLoRA on the tiny model (shared: the merge test reuses its adapter)."""
    out = tmp_path_factory.mktemp("nf4") / "run"
    return train(_config(out, tiny_model_dir, data, NF4))


@needs_bnb
@pytest.mark.slow
def test_nf4_qlora_trains_the_tiny_model_and_the_loss_falls(nf4_run, tiny_model_dir):
    losses = _losses(nf4_run)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses  # random base: a steady, modest fall
    adapter = load_file(nf4_run.adapter_dir / "adapter_model.safetensors")
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
    assert any("lora_B" in name and t.abs().max() > 0 for name, t in adapter.items())  # B starts at zero
    summary = json.loads((nf4_run.run_dir / "training_summary.json").read_text())
    assert summary["base_weights_unchanged"] is True
    assert yaml_quant(nf4_run.adapter_dir) == NF4
    # The base-weight proof covers the quantized storage itself: the packed 4-bit data and its quantization state.
    check = json.loads((nf4_run.adapter_dir / "metadata.json").read_text())["base_weight_check"]
    assert check["unchanged"] is True and check["fingerprint"] == check["fingerprint_after"]
    from lorafit.artifact.integrity import frozen_fingerprint
    from lorafit.model.loading import load_base_model
    from lorafit.config import ModelConfig, QuantConfig

    quantized = load_base_model(ModelConfig(path=str(tiny_model_dir)), str(tiny_model_dir), QuantConfig(**NF4))
    digests = frozen_fingerprint(quantized.requires_grad_(False))
    assert any(name.endswith("#absmax") for name in digests)  # scales outside the parameter are hashed too


@needs_bnb
@pytest.mark.slow
def test_merging_a_qlora_adapter_reloads_the_base_in_full_precision_and_reports_the_gap(nf4_run, tmp_path):
    from lorafit.export.merge import merge_adapter

    report = merge_adapter(nf4_run.adapter_dir, tmp_path / "merged", dtype="fp32")  # quant read from the run
    assert report["max_abs_logit_diff"] <= 1e-5  # merged into fp32 weights, not into the 4-bit ones
    gap = report["quantization_gap"]
    assert gap["quant"] == NF4 and 0 < gap["mean_abs_logit_diff"] <= gap["max_abs_logit_diff"]
    assert json.loads((tmp_path / "merged" / "merge_report.json").read_text())["quantization_gap"] == gap


def yaml_quant(run_dir):
    import yaml

    return yaml.safe_load((run_dir / "training_config.yaml").read_text())["quant"]


@needs_bnb
def test_frequent_evaluation_does_not_change_the_qlora_adapter(tmp_path, tiny_model_dir, data):
    """Evaluation every step (and at the start) vs none: same losses, same adapter bytes."""
    adapters, losses = [], []
    for every in (1, None):
        result = train(_config(tmp_path / f"every-{every}", tiny_model_dir, data, NF4, every=every, max_steps=6))
        adapters.append((result.adapter_dir / "adapter_model.safetensors").read_bytes())
        losses.append(_losses(result))
    evals = [json.loads(line) for line in (tmp_path / "every-1" / "metrics_history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if "eval_loss" in r] == [0, 1, 2, 3, 4, 5, 6]  # evaluation really ran
    assert losses[0] == losses[1]
    assert adapters[0] == adapters[1]


def _lora_grads(model, ids):
    model.zero_grad()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@needs_bnb
@pytest.mark.parametrize("guarded", [True, False])
def test_an_eval_forward_leaves_4bit_lora_gradients_unchanged_only_with_the_guard(tiny_model_dir, guarded):
    """The root cause, isolated: bitsandbytes repacks 4-bit weights on an eval-mode CPU forward (AVX512-BF16 only)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from lorafit.config import ModelConfig, QuantConfig
    from lorafit.model.loading import load_base_model
    from lorafit.model.quantization import packed_4bit_layers, prepare_for_kbit_training

    if not guarded and not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here, nothing to show")
    model = load_base_model(ModelConfig(path=str(tiny_model_dir)), str(tiny_model_dir), QuantConfig(**NF4))
    model = prepare_for_kbit_training(model)
    if not guarded:
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = True  # bitsandbytes' own default on this CPU
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 2]])
    before = _lora_grads(model, ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = _lora_grads(model, ids)
    worst = max((before[n] - after[n]).abs().max().item() / before[n].abs().max().item() for n in before)
    if guarded:
        assert packed_4bit_layers(model) == [] and worst == 0.0
    else:
        assert len(packed_4bit_layers(model)) == 28 and worst > 0.1  # why the guard exists


@needs_bnb
@pytest.mark.slow
def test_8bit_base_loads_and_trains_with_paged_adamw_8bit(tmp_path, tiny_model_dir, data):
    import bitsandbytes as bnb

    seen = {}

    from lorafit import LorafitCallback

    class Inspect(LorafitCallback):
        def on_train_begin(self, loop):
            seen["linear"] = type(loop.model.base_model.model.model.layers[0].mlp.down_proj.base_layer)
            self.optimizer = loop.optimizer

        def on_step_end(self, step, logs):
            optimizer = self.optimizer
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
            seen["optimizer"] = (type(inner), inner.is_paged, inner.args.optim_bits)

    result = train(_config(tmp_path / "int8", tiny_model_dir, data, {"bits": 8}, max_steps=6,
                           optimizer="paged_adamw_8bit"), extra_callbacks=[Inspect()])
    assert seen["linear"] is bnb.nn.Linear8bitLt
    assert seen["optimizer"] == (bnb.optim.AdamW, True, 8)  # what PagedAdamW8bit is: paged, 8-bit states
    losses = _losses(result)
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < 0.9 * sum(losses[:2]) / 2, losses
    assert json.loads((result.run_dir / "training_summary.json").read_text())["base_weights_unchanged"] is True


def test_quantization_without_bitsandbytes_says_how_to_install_it(tmp_path, tiny_model_dir, data, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what Python does for a package that is not installed
    with pytest.raises(LorafitError, match=r"-m pip install -e '\.\[qlora\]' in the lorafit checkout"):
        train(_config(tmp_path / "no-bnb", tiny_model_dir, data, NF4))
    assert not (tmp_path / "no-bnb" / "training_summary.json").exists()


@needs_bnb  # the fp16 here is quant.compute_dtype, checked after bitsandbytes is found
def test_fp16_autocast_without_a_gpu_is_a_clear_error(tmp_path, tiny_model_dir, data):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: fp16 is supported")
    with pytest.raises(LorafitError, match=r"quant\.compute_dtype: fp16 mixed precision needs a CUDA GPU"):
        train(_config(tmp_path / "fp16", tiny_model_dir, data, {**NF4, "compute_dtype": "fp16"}))


def test_gradient_checkpointing_recomputes_without_changing_the_gradients(tmp_path, tiny_model_dir, data):
    """Non-reentrant checkpointing: the same loss and adapter gradients as a plain run (fp32, one step)."""
    from test_training import CaptureGrads

    class CaptureMode(CaptureGrads):
        def on_train_begin(self, loop):
            self.checkpointing = loop.model.base_model.model.model.gradient_checkpointing

    captured = []
    for checkpointing in (False, True):
        capture = CaptureMode()
        train(_config(tmp_path / f"gc-{checkpointing}", tiny_model_dir, data, {}, max_steps=1,
                      gradient_checkpointing=checkpointing), extra_callbacks=[capture])
        assert capture.checkpointing is checkpointing
        captured.append(capture)
    plain, checkpointed = captured
    assert plain.grads.keys() == checkpointed.grads.keys() and plain.grads
    assert plain.losses == checkpointed.losses
    for name, grad in plain.grads.items():
        assert torch.allclose(grad, checkpointed.grads[name], rtol=1e-5, atol=1e-8), name
