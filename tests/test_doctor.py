"""`lorafit doctor`: a ready setup passes; each broken one exits 1 and names its fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import conversation, write_jsonl
from typer.testing import CliRunner

from lorafit.cli import app


def _setup(tmp_path: Path, model_dir: Path, *, data_rows: str | None = None, output_dir: str = "runs/x") -> Path:
    data = tmp_path / "train.jsonl"
    if data_rows is None:
        write_jsonl(data, [conversation(f"question {i}?", f"answer {i}") for i in range(12)])
    else:
        data.write_text(data_rows)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{path: {model_dir}, dtype: fp32}}\ndata: {{train: [{{path: train.jsonl}}]}}\n"
                      f"train: {{output_dir: {output_dir}}}\n")
    return config


def _doctor(*args: str):
    done = CliRunner().invoke(app, ["doctor", *args, "--json"])
    return done.exit_code, {c["name"]: c for c in json.loads(done.stdout)} if done.stdout.startswith("[") else done.output


def test_a_good_setup_passes(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, checks = _doctor(str(_setup(tmp_path, tiny_model_dir)), "--gpu-memory", "8GB")
    assert code == 0, checks
    for name in ("python", "torch", "transformers", "peft", "config", "cuda", "bf16" if "bf16" in checks else "cuda",
                 "output folder", "free disk", "model weights", "tokenizer", "chat template", "pad token", "data",
                 "memory plan"):
        assert checks[name]["status"] in ("ok", "warn"), checks[name]
    assert checks["memory plan"]["status"] == "ok" and "fits in 8.0 GiB" in checks["memory plan"]["detail"]


def test_without_a_config_only_the_machine_is_checked(tmp_path):
    done = CliRunner().invoke(app, ["doctor"])
    assert done.exit_code == 0, done.output
    assert "transformers" in done.output and "attention" in done.output and "model weights" not in done.output


def test_missing_model_weights_fail_with_the_fix(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("*.safetensors"))
    code, checks = _doctor(str(_setup(tmp_path, model)))
    assert code == 1
    assert checks["model weights"]["status"] == "fail" and "safetensors" in checks["model weights"]["fix"]
    assert "memory plan" not in checks  # nothing to plan without a model


def test_unreadable_data_fails_naming_the_line(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = json.dumps(conversation("q", "a")) + "\n{not json\n"
    code, checks = _doctor(str(_setup(tmp_path, tiny_model_dir, data_rows=rows)))
    assert code == 1
    assert checks["data"]["status"] == "fail" and "train.jsonl:2" in checks["data"]["detail"]


def test_an_output_folder_that_cannot_be_written_fails(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file where the run folder's parent should be")
    code, checks = _doctor(str(_setup(tmp_path, tiny_model_dir, output_dir="blocker/run")))
    assert code == 1
    assert checks["output folder"]["status"] == "fail" and "train.output_dir" in checks["output folder"]["fix"]


def test_a_plan_that_does_not_fit_fails_with_the_cheapest_change(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(_setup(tmp_path, tiny_model_dir))
    peak = json.loads(CliRunner().invoke(app, ["plan", config, "--json"]).stdout)["peak_gib"]
    code, checks = _doctor(config, "--gpu-memory", f"{0.5 + 0.6 * peak:.4f}GB")
    assert code == 1
    plan = checks["memory plan"]
    assert plan["status"] == "fail" and "does NOT fit" in plan["detail"] and "--set train.batch_size=" in plan["fix"]


def test_the_table_names_each_fix(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("*.safetensors"))
    done = CliRunner().invoke(app, ["doctor", str(_setup(tmp_path, model))])
    assert done.exit_code == 1
    assert "FAIL  model weights" in done.output and "fix: copy the model's .safetensors files" in done.output
    assert "1 failed" in done.output
