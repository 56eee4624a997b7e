"""The contrastive objective and plugin objectives through the real run: train(), metrics_history.jsonl, the
best step, config errors, and an interrupted run resumed to the same adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FirstGrads, write_jsonl

from lorafit import LorafitCallback, load_config, train
from lorafit.data.sample_triplets import generate_triplets
from lorafit.errors import LorafitError


def _triplet_rows(n: int, seed: int = 11) -> list[dict]:
    rows, _ = generate_triplets(n_train=n, n_eval=0, seed=seed)
    for i, row in enumerate(rows):
        row["target"] += " Done." * (i % 3)  # unequal answers: per-token normalisation matters
    return rows


def _config(folder: Path, model_dir: Path, *, objective=None, train_overrides=None, eval_section=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", _triplet_rows(8))
    write_jsonl(folder / "eval.jsonl", _triplet_rows(4, seed=12))
    config = {
        "model": {"path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "objective": objective or {"type": "contrastive", "lambda_causal": 0.5, "lambda_task": 0.7},
        "data": {"train": [{"path": "train.jsonl"}], "eval": [{"path": "eval.jsonl"}], "max_seq_length": 256},
        "train": {"output_dir": str(folder / "run"), "max_steps": 1, "batch_size": 4, "grad_accum": 1,
                  "group_by_length": False, "log_every": 1, "seed": 3, "max_grad_norm": None,
                  **(train_overrides or {})},
        "eval": eval_section or {"every": None, "at_start": False, "generate_samples": 0, "attack": {"samples": 0}},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics_history.jsonl").read_text().splitlines()]


def test_batch_4_accum_1_equals_batch_1_accum_4(tmp_path, tiny_model_dir):
    captured, losses = {}, {}
    for batch, accum in ((4, 1), (1, 4)):
        capture = FirstGrads()
        config = load_config(_config(tmp_path / f"b{batch}", tiny_model_dir,
                                     train_overrides={"batch_size": batch, "grad_accum": accum}))
        result = train(config, extra_callbacks=[capture])
        captured[batch] = capture.grads
        first = next(r for r in _history(result.run_dir) if "loss" in r)
        losses[batch] = first
    assert captured[4].keys() == captured[1].keys() and captured[4]
    for name, grad in captured[4].items():
        diff = (grad - captured[1][name]).norm() / grad.norm().clamp_min(1e-12)
        assert diff < 1e-5, f"{name}: relative gradient difference {diff:.2e}"
    assert losses[4]["loss"] == pytest.approx(losses[1]["loss"], rel=1e-5)
    for name in ("causal_stability", "spurious_separation", "causal_discrimination", "task_loss"):
        assert losses[4][name] == pytest.approx(losses[1][name], rel=1e-5)


PLUGIN = '''
from lorafit.training.objectives import ContrastiveObjective


class HalfContrast(ContrastiveObjective):
    """The contrastive loss at half weight, logging one metric of its own."""

    def compute(self, model, batch, totals=None):
        loss, metrics = super().compute(model, batch, totals)
        return loss * 0.5, {**metrics, "half": 0.5}
'''


def test_a_loss_class_from_a_dotted_path_trains_and_its_metrics_are_logged(tmp_path, tiny_model_dir):
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "half_loss.py").write_text(PLUGIN, encoding="utf-8")
    config = load_config(_config(folder, tiny_model_dir, objective={"type": "half_loss:HalfContrast"},
                                 train_overrides={"max_steps": 2},
                                 eval_section={"every": 1, "at_start": True, "generate_samples": 0,
                                               "attack": {"samples": 0}}))
    result = train(config)
    history = _history(result.run_dir)
    train_rows = [r for r in history if "loss" in r]
    eval_rows = [r for r in history if "eval_loss" in r]
    assert len(train_rows) == 2 and all(r["half"] == 0.5 and "causal_stability" in r for r in train_rows)
    assert len(eval_rows) == 3 and all(r["eval_half"] == 0.5 for r in eval_rows)


def test_an_unknown_objective_path_is_a_clear_error(tmp_path, tiny_model_dir):
    config = load_config(_config(tmp_path, tiny_model_dir, objective={"type": "no_such_losses:Loss"}))
    with pytest.raises(LorafitError) as info:
        train(config)
    assert "objective.type: module 'no_such_losses' not found" in str(info.value)
    assert not (tmp_path / "run" / "training_summary.json").exists()


def test_causal_stability_picks_the_best_step_and_is_reported(tmp_path, tiny_model_dir):
    config = load_config(_config(tmp_path, tiny_model_dir, train_overrides={"max_steps": 4, "learning_rate": 5e-3},
                                 eval_section={"every": 2, "at_start": True, "generate_samples": 0,
                                               "best": {"metric": "eval_causal_stability"},
                                               "attack": {"samples": 2}}))
    result = train(config)
    history = _history(result.run_dir)
    values = {r["step"]: r["eval_causal_stability"] for r in history if "eval_causal_stability" in r}
    assert sorted(values) == [0, 2, 4]
    assert result.best["metric"] == "eval_causal_stability" and result.best["mode"] == "max"
    assert result.best["value"] == pytest.approx(max(values.values()))
    results = json.loads((result.run_dir / "training_results.json").read_text())
    attack = results["attack"]
    assert attack["examples"] == 2 and set(attack["base"]) == {"attack_success_rate"}
    report = (result.run_dir / "report.html").read_text()
    assert "causal_stability" in report and "attack success rate" in report.lower()


def test_a_killed_contrastive_run_resumes_to_the_same_adapter_and_history(tmp_path, tiny_model_dir):
    """SIGKILL a CLI run once and resume: adapter bytes and every logged value (causal metrics included) equal the
    uninterrupted run's. log_every 3 with save_every 2 puts checkpoints between logs, so the objective's metric
    sums since the last log must travel in the checkpoint."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    import kill_resume

    overrides = {"max_steps": 8, "batch_size": 2, "grad_accum": 2, "log_every": 3, "save_every": 2,
                 "learning_rate": 5e-3, "max_grad_norm": 1.0}
    eval_section = {"every": 4, "at_start": True, "generate_samples": 0, "attack": {"samples": 0}}
    reference = train(load_config(_config(tmp_path / "reference", tiny_model_dir, train_overrides=overrides,
                                          eval_section=eval_section)))
    ref_history = kill_resume.history(reference.run_dir)
    assert any("causal_stability" in r and r["step"] == 3 for r in ref_history)

    config = _config(tmp_path / "killed", tiny_model_dir, train_overrides=overrides, eval_section=eval_section)
    run_dir = tmp_path / "killed" / "run"
    killed_at = kill_resume.kill_after_checkpoint(config, run_dir)
    assert 2 <= killed_at < 8
    resumed = train(load_config(config), resume="auto")
    assert resumed.adapter_dir is not None
    adapter = resumed.adapter_dir / "adapter_model.safetensors"
    assert adapter.read_bytes() == (reference.adapter_dir / "adapter_model.safetensors").read_bytes()
    assert kill_resume.history(run_dir) == ref_history


class AnomalyMode(LorafitCallback):
    def __init__(self):
        self.during: list[bool] = []
        self.empty_cache_steps = None

    def on_train_begin(self, loop):
        self.settings = loop.settings

    def on_step_end(self, step, logs):
        self.during.append(torch.is_anomaly_enabled())
        self.empty_cache_steps = self.settings.empty_cache_every


def test_debug_detect_anomaly_and_empty_cache_every_reach_the_training_loop(tmp_path, tiny_model_dir):
    path = _config(tmp_path, tiny_model_dir, train_overrides={"empty_cache_every": 3})
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "debug": {"detect_anomaly": True}}))
    seen = AnomalyMode()
    train(load_config(path), extra_callbacks=[seen])
    assert seen.during == [True] and seen.empty_cache_steps == 3
    assert not torch.is_anomaly_enabled()  # switched off again after the run


@pytest.mark.skipif(__import__("importlib").util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_contrastive_training_on_a_4bit_base_trains_and_keeps_the_base(tmp_path, tiny_model_dir):
    """QLoRA (NF4 base, real bitsandbytes CPU path) with the contrastive objective: the run finishes, the loss and the
    causal metrics are logged, the adapter moved, and the 4-bit base is proven unchanged (as for SFT)."""
    path = _config(tmp_path, tiny_model_dir, train_overrides={"max_steps": 3, "learning_rate": 1e-3})
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["quant"] = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "fp32"}
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = train(load_config(path), progress=False)
    records = [r for r in _history(result.run_dir) if "loss" in r]
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert all(0.0 <= r["spurious_separation"] <= 2.0 and -1.0 <= r["causal_stability"] <= 1.0 for r in records)
    summary = json.loads((result.run_dir / "training_summary.json").read_text(encoding="utf-8"))
    assert summary["base_weights_unchanged"] is True
    metadata = json.loads((result.adapter_dir / "metadata.json").read_text(encoding="utf-8"))
    assert metadata["base_model"]["quantization"]["bits"] == 4


def test_the_summary_shows_the_parts_base_to_adapter_not_a_combined_loss_change(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from lorafit.cli import app

    config = _config(tmp_path, tiny_model_dir, train_overrides={"max_steps": 3},
                     eval_section={"every": None, "at_start": True, "generate_samples": 0, "attack": {"samples": 0}})
    out = CliRunner().invoke(app, ["train", str(config)])
    assert out.exit_code == 0, out.output
    summary = out.output.split("training finished")[1]
    for part in ("causal_stability", "spurious_separation", "causal_discrimination", "task_loss"):
        assert f"  {part} " in summary and "(first -> final evaluation)" in summary, summary
    assert "eval loss" not in summary and "% lower" not in summary and "ppl" not in summary
    assert "(eval_causal_stability)" not in summary  # each part once, not again under a short label
