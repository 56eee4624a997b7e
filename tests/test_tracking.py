"""MLflow and W&B in their local/offline modes: files in the run folder, no network.

MLflow runs in every CI run (mlflow-skinny is in the `dev` extra); W&B only where its extra is installed."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from conftest import REPO, write_jsonl

from lorafit import load_config, train

TRACKER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY")


def _installed(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"extra {module} not installed (pip install 'lorafit[{module}]')")


def _run(tmp_path, monkeypatch, tiny_model_dir, trackers: list[str]):
    for name in TRACKER_ENV:
        monkeypatch.delenv(name, raising=False)
    rows = [json.loads(line) for line in (REPO / "examples/data/quickstart_train.jsonl").read_text().splitlines()[:16]]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    result = train(load_config({
        "model": {"path": str(tiny_model_dir)},
        "data": {"train": [{"path": str(data)}], "eval": [{"path": str(data)}]},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 8, "log_every": 1},
        "eval": {"every": 2, "generate_samples": 0},
        "tracking": {"report_to": trackers},
    }))
    assert not any(name in os.environ for name in TRACKER_ENV)  # restored after the run
    return result


@_installed("mlflow")
def test_mlflow_file_store_receives_lorafit_metrics(tmp_path, tiny_model_dir, monkeypatch):
    result = _run(tmp_path, monkeypatch, tiny_model_dir, ["mlflow"])
    runs = [p for p in (result.run_dir / "mlruns").glob("*/*/metrics") if p.is_dir()]
    assert len(runs) == 1
    for metric in ("loss", "eval_loss", "eval_perplexity", "supervised_tokens_per_second", "peak_rss_mb"):
        timestamp, value, step = (runs[0] / metric).read_text().split("\n")[0].split()  # "timestamp value step"
        assert float(value) > 0, metric
    loss_steps = [int(line.split()[2]) for line in (runs[0] / "loss").read_text().splitlines()]
    assert loss_steps == [1, 2]


@_installed("wandb")
def test_wandb_offline_receives_a_run(tmp_path, tiny_model_dir, monkeypatch):
    result = _run(tmp_path, monkeypatch, tiny_model_dir, ["wandb"])
    assert list((result.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
