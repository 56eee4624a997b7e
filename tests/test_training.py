"""Real training on the tiny model: accumulation maths, frozen base, adapter files that peft loads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import conversation, write_jsonl
from safetensors.torch import load_file
from lorafit import LorafitCallback, load_config, train
from lorafit.errors import LorafitError


def _unequal_rows(n: int) -> list[dict]:
    """Conversations of clearly different lengths, so padding and per-token normalisation matter."""
    rows = []
    for i in range(n):
        words = " ".join(["alpha", "beta", "gamma", "delta"][: 1 + i % 4] * (1 + i))
        rows.append(conversation(f"Repeat: {words}", words, system="Be brief." if i % 2 else None))
    return rows


def _config(tmp_path, model_dir, data, **train_overrides):
    train_section = {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 8, "grad_accum": 1,
                     "group_by_length": False, "log_every": 1, "seed": 7, **train_overrides}
    return load_config({
        "model": {"path": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": [{"path": str(data)}], "max_seq_length": 512},
        "train": train_section,
        "eval": {"every": None, "at_start": False},
    })


class CaptureGrads(LorafitCallback):
    """Adapter gradients just before the first optimizer step, and every logged train loss."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}
        self.losses: list[float] = []

    def on_before_optimizer_step(self, step, loop):
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in loop.model.named_parameters() if p.requires_grad}

    def on_step_end(self, step, logs):
        if "loss" in logs:
            self.losses.append(logs["loss"])


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", _unequal_rows(8))
    results = {}
    for batch, accum in ((8, 1), (2, 4)):
        capture = CaptureGrads()
        config = _config(tmp_path / f"b{batch}", tiny_model_dir, data, batch_size=batch, grad_accum=accum,
                         max_grad_norm=None)
        train(config, extra_callbacks=[capture])
        results[(batch, accum)] = capture
    big, small = results[(8, 1)], results[(2, 4)]
    assert big.grads.keys() == small.grads.keys() and len(big.grads) > 0
    assert big.losses[0] == pytest.approx(small.losses[0], rel=1e-5)
    for name, grad in big.grads.items():
        assert torch.count_nonzero(grad) > 0 or "lora_B" not in name
        diff = (grad - small.grads[name]).norm() / grad.norm().clamp_min(1e-12)
        assert diff < 1e-5, f"{name}: relative gradient difference {diff:.2e}"


def _base_digests_from_file(model_dir) -> dict[str, bytes]:
    return {name: t.contiguous().view(torch.uint8).numpy().tobytes() for name, t in load_file(model_dir / "model.safetensors").items()}


class FrozenAtEnd(LorafitCallback):
    def __init__(self):
        self.frozen: dict[str, bytes] = {}

    def on_train_end(self, step, loop):
        for name, param in loop.model.named_parameters():
            if not param.requires_grad:
                # peft names: base_model.model.<hf name> with .base_layer. inside adapted layers
                hf_name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
                self.frozen[hf_name] = param.detach().contiguous().view(torch.uint8).numpy().tobytes()


def test_every_frozen_base_tensor_is_bit_identical_after_training(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", _unequal_rows(16))
    capture = FrozenAtEnd()
    result = train(_config(tmp_path, tiny_model_dir, data, max_steps=4, batch_size=4, learning_rate=1e-2),
                   extra_callbacks=[capture])
    on_disk = _base_digests_from_file(tiny_model_dir)
    assert set(on_disk) == set(capture.frozen)
    changed = [n for n in on_disk if on_disk[n] != capture.frozen[n]]
    assert changed == []
    summary = json.loads((result.run_dir / "training_summary.json").read_text())
    assert summary["base_weights_unchanged"] is True


class PerturbBase(LorafitCallback):
    """Test-only hook: change one frozen weight mid-training, as a buggy optimizer setup would."""

    def on_train_begin(self, loop):
        self.model = loop.model

    def on_step_end(self, step, logs):
        if step == 2:
            with torch.no_grad():
                dict(self.model.named_parameters())["base_model.model.model.layers.1.mlp.up_proj.base_layer.weight"][0, 0] += 1.0


def test_a_changed_base_weight_fails_the_run_naming_the_tensor(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", _unequal_rows(8))
    with pytest.raises(LorafitError, match=r"layers\.1\.mlp\.up_proj\.base_layer\.weight"):
        train(_config(tmp_path, tiny_model_dir, data, max_steps=3, batch_size=4), extra_callbacks=[PerturbBase()])
    run = tmp_path / "run"
    assert not (run / "training_summary.json").exists()  # the run does not look finished
    assert not list(run.glob("*/final_artifact"))  # and no artifact was published
    failed = json.loads((run / "result.json").read_text())
    assert failed["status"] == "failed" and "base weights changed" in failed["error"]["message"]


def test_unknown_target_module_lists_the_models_linear_layers(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", _unequal_rows(2))
    config = _config(tmp_path, tiny_model_dir, data)
    config = load_config({**config.to_dict(), "lora": {"target_modules": ["q_prj"]}})
    with pytest.raises(LorafitError) as caught:
        train(config)
    message = str(caught.value)
    assert "['q_prj'] not found" in message and "'q_proj'" in message and "'down_proj'" in message


def test_same_seed_same_adapter_bytes(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", _unequal_rows(8))
    files = []
    for name in ("a", "b"):
        result = train(_config(tmp_path / name, tiny_model_dir, data, max_steps=2, batch_size=4))
        files.append({f: (result.adapter_dir / f).read_bytes() for f in ("adapter_model.safetensors", "adapter_config.json")})
    assert files[0] == files[1]
