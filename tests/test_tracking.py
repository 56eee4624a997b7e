"""MLflow and W&B in their local/offline modes: files in the run folder, no network. Skipped without the extras."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import REPO, write_jsonl

from lorafit import load_config, train

needs = pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None or importlib.util.find_spec("wandb") is None,
    reason="extras mlflow and wandb not installed (pip install 'lorafit[mlflow,wandb]')",
)


@needs
def test_mlflow_file_store_and_wandb_offline_receive_lorafit_metrics(tmp_path, tiny_model_dir, monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    rows = [json.loads(line) for line in (REPO / "examples/data/quickstart_train.jsonl").read_text().splitlines()[:16]]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    config = load_config({
        "model": {"path": str(tiny_model_dir)},
        "data": {"train": [{"path": str(data)}], "eval": [{"path": str(data)}]},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 8, "log_every": 1},
        "eval": {"every": 2, "generate_samples": 0},
        "tracking": {"report_to": ["mlflow", "wandb"]},
    })
    result = train(config)
    runs = [p for p in (result.run_dir / "mlruns").glob("*/*/metrics") if p.is_dir()]
    assert len(runs) == 1
    for metric in ("loss", "eval_loss", "eval_perplexity", "supervised_tokens_per_second", "peak_rss_mb"):
        lines = (runs[0] / metric).read_text().split("\n")
        assert lines[0].split()[1], metric  # "timestamp value step"
    assert list((result.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    import os

    assert "MLFLOW_TRACKING_URI" not in os.environ and "WANDB_MODE" not in os.environ  # restored after the run
