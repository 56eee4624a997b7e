"""The same configs on an NVIDIA GPU: QLoRA with bf16 compute, paged 8-bit AdamW. Skipped without CUDA."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import conversation, write_jsonl

from lorafit import load_config, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)"),
]


def _config(tmp_path, model_dir, quant, **train_section):
    rows = [conversation(f"Say {w}", f"{w} {w}") for w in "red blue green black white pink gray gold".split()]
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    return load_config({
        "model": {"path": str(model_dir), "dtype": "bf16"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "quant": quant,
        "data": {"train": [{"path": str(data)}], "eval": [{"path": str(data)}], "max_seq_length": 64},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 30, "batch_size": 4, "learning_rate": 3e-3,
                  "log_every": 1, "seed": 3, **train_section},
        "eval": {"every": 10, "at_start": True},
    })


def _losses(result):
    rows = [json.loads(line) for line in (result.run_dir / "metrics_history.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_qlora_nf4_bf16_compute_trains_on_the_gpu(tmp_path, tiny_model_dir):
    import bitsandbytes as bnb

    from lorafit import LorafitCallback

    seen = {}

    class Inspect(LorafitCallback):
        def on_train_begin(self, loop):
            layer = loop.model.base_model.model.model.layers[0].mlp.down_proj.base_layer
            seen.update(kind=type(layer), device=layer.weight.device.type, compute=layer.compute_dtype,
                        bf16=loop.accelerator.mixed_precision == "bf16")

    config = _config(tmp_path, tiny_model_dir, {"bits": 4, "compute_dtype": "bf16"}, optimizer="paged_adamw_8bit",
                     gradient_checkpointing=True)
    result = train(config, extra_callbacks=[Inspect()])
    assert seen == {"kind": bnb.nn.Linear4bit, "device": "cuda", "compute": torch.bfloat16, "bf16": True}
    losses = _losses(result)
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses


def test_bf16_lora_and_fp16_autocast_on_the_gpu(tmp_path, tiny_model_dir):
    result = train(_config(tmp_path / "bf16", tiny_model_dir, {}, max_steps=10))
    assert result.metrics["eval_loss_final"] < result.metrics["eval_loss_first"]
    fp16 = train(_config(tmp_path / "fp16", tiny_model_dir, {"bits": 4, "compute_dtype": "fp16"}, max_steps=10))
    assert all(loss == loss for loss in _losses(fp16))  # no NaN under loss scaling
