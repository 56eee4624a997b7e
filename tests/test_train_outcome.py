"""What a run tells its watcher and leaves behind: the public callback interface, progress, the health of a run
(a diverged run is not a success), the output folder's rules, file modes, --dry-run and --max-steps, and the
refusal of callbacks written for transformers' Trainer."""

from __future__ import annotations

import io
import json
import os
import stat

import pytest
from conftest import REPO, write_jsonl
from typer.testing import CliRunner

from lorafit import LorafitCallback, Progress, load_config, train
from lorafit.cli import app
from lorafit.errors import LorafitError
from lorafit.run_folder import RunFolder, write_atomic

runner = CliRunner()


def _rows(n: int = 16) -> list[dict]:
    lines = (REPO / "examples/data/quickstart_train.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def _config_dict(tmp_path, model_dir, *, train=None, eval=None) -> dict:
    data = write_jsonl(tmp_path / "train.jsonl", _rows())
    return {
        "model": {"path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": [{"path": str(data)}], "eval": [{"path": str(data)}], "max_seq_length": 256},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 8, "learning_rate": 2e-3,
                  "log_every": 1, "seed": 3, **(train or {})},
        "eval": {"every": 2, "at_start": True, "generate_samples": 0, **(eval or {})},
        "artifact": {"name": "watch", "version": "0.0.1"},
        "tracking": {"report_to": []},
    }


def _config_file(tmp_path, model_dir, **sections) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_config_dict(tmp_path, model_dir, **sections)))
    return str(path)


# ---------------------------------------------------------------------------------------------- old callbacks


def test_a_transformers_trainer_callback_is_refused_naming_the_replacement(tmp_path, tiny_model_dir):
    """lorafit no longer runs transformers' Trainer: a TrainerCallback would silently never be called."""
    from transformers import TrainerCallback

    class OldStyle(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    with pytest.raises(LorafitError) as caught:
        train(load_config(_config_dict(tmp_path, tiny_model_dir)), callbacks=[OldStyle()], progress=False)
    message = caught.value.render()
    assert "OldStyle is not a lorafit.LorafitCallback" in message and "on_before_optimizer_step" in message
    assert "TrainerCallback events" in message
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything trained


# ---------------------------------------------------------------------------------------------- callbacks, progress


class Recorder(LorafitCallback):
    def __init__(self):
        self.steps, self.evaluations, self.saves = [], [], []

    def on_step_end(self, step, logs):
        self.steps.append((step, logs.get("loss")))

    def on_evaluate(self, step, metrics):
        self.evaluations.append((step, metrics["eval_loss"], metrics.get("eval_perplexity")))

    def on_save(self, step, checkpoint_dir):
        self.saves.append((step, checkpoint_dir.name, (checkpoint_dir / "manifest.json").is_file()))


def test_a_user_callback_sees_every_step_evaluation_and_save_and_progress_prints_each_log(tmp_path, tiny_model_dir):
    recorder, stream = Recorder(), io.StringIO()
    config = _config_dict(tmp_path, tiny_model_dir, train={"save_every": 2})
    config = load_config({**config, "tracking": {"report_to": ["tensorboard"]}})
    result = train(config, callbacks=[recorder], progress=Progress(stream))
    history = [json.loads(line) for line in (result.run_dir / RunFolder.HISTORY).read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in history if "loss" in r}
    assert recorder.steps == [(step, losses[step]) for step in (1, 2, 3, 4)]  # every step, with its logged loss
    evals = {r["step"]: r["eval_loss"] for r in history if "eval_loss" in r}
    assert [(s, loss) for s, loss, _ in recorder.evaluations] == [(0, evals[0]), (2, evals[2]), (4, evals[4])]
    assert all(ppl is not None for _, _, ppl in recorder.evaluations)  # lorafit's derived values reach it too
    assert recorder.saves == [(2, "step-00000002", True), (4, "step-00000004", True)]
    lines = stream.getvalue().splitlines()
    assert sum(line.startswith("step ") and "loss" in line for line in lines) == 4 + 3  # 4 train logs, 3 evals
    assert any(line.startswith("trainable parameters:") for line in lines)
    # 28: the checkpoint's hash of the resume-relevant keys is named apart from metadata.json's config_sha256
    meta = json.loads((result.run_dir / "checkpoints" / "step-00000004" / "checkpoint.json").read_text())
    assert "config_sha256" not in meta and len(meta["resume_config_sha256"]) == 64
    assert result.health["status"] == "ok" and result.metrics["health"] == "ok"
    # trackers come after MetricsHistory in the callback order, so they log the values it derives
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(result.run_dir / RunFolder.TENSORBOARD))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert any(t.endswith("tokens_per_second") for t in tags) and any(t.endswith("perplexity") for t in tags), tags


def test_progress_false_is_silent(tmp_path, tiny_model_dir, capsys):
    train(load_config(_config_dict(tmp_path, tiny_model_dir, train={"max_steps": 1}, eval={"every": None})),
          progress=False)
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------- the CLI run


def test_cli_max_steps_no_start_eval_summary_and_normal_file_modes(tmp_path, tiny_model_dir):
    config = _config_file(tmp_path, tiny_model_dir, train={"max_steps": 9, "save_every": 2},
                          eval={"at_start": False})
    previous = os.umask(0o022)
    try:
        out = runner.invoke(app, ["train", config, "--max-steps", "2", "--set", "artifact.merge=true"])
    finally:
        os.umask(previous)
    assert out.exit_code == 0, out.output
    run = tmp_path / "run"
    summary = json.loads((run / RunFolder.SUMMARY).read_text())
    assert summary["metrics"]["steps"] == 2
    # 4: no evaluation ran before training, so there is no "before" to compare with, and none is made up
    assert "eval_loss_first" not in summary["metrics"] and "eval_loss_reduction" not in summary["metrics"]
    assert "% lower" not in out.output
    assert "no evaluation before training: eval.at_start is false" in out.output
    # 7: files and folders get the umask's permissions, not tempfile's private 0600/0700
    artifact = run / "watch-v0.0.1" / "final_artifact"
    merged = sorted((run / RunFolder.MERGED).glob("*.safetensors"))
    assert merged
    for path in (run / RunFolder.RESULT, run / RunFolder.REPORT, run / RunFolder.SUMMARY, *merged,
                 artifact / "adapter_model.safetensors", artifact / "checksums.json", artifact / "metadata.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE(artifact.stat().st_mode) == stat.S_IMODE((run / RunFolder.MERGED).stat().st_mode) == 0o755


def test_a_diverged_run_is_not_a_success(tmp_path, tiny_model_dir):
    # learning_rate 1e6 drives the tiny model to the uniform guess, ln(1024), with zero gradients: every value
    # is finite, the NaN guard never trips, and the run used to finish with "training finished" and exit 0.
    config = _config_file(tmp_path, tiny_model_dir, train={"learning_rate": 1e6, "max_steps": 8},
                          eval={"every": None, "at_start": False})
    out = runner.invoke(app, ["train", config])
    assert out.exit_code == 3, out.output
    assert "training diverged" in out.output and "training finished" not in out.output
    run = tmp_path / "run"
    result = json.loads((run / RunFolder.RESULT).read_text())
    assert result["status"] == "failed" and result["error"]["type"] == "TrainingDiverged"
    assert result["health"]["signals"]["gradients_vanished"] is True
    for name in (RunFolder.RESULTS, RunFolder.SUMMARY):
        assert json.loads((run / name).read_text())["health"]["status"] == "diverged", name
    metadata = json.loads((run / "watch-v0.0.1" / "final_artifact" / "metadata.json").read_text())
    assert metadata["training_health"]["status"] == "diverged"


def test_a_collapse_between_two_log_lines_is_seen_and_the_summary_claims_no_progress(tmp_path, tiny_model_dir):
    # 6 steps, log_every 10: only steps 1 and 6 are logged; the collapse to ln(1024) happens in between.
    config = _config_file(tmp_path, tiny_model_dir, train={"learning_rate": 1e6, "max_steps": 6, "log_every": 10},
                          eval={"every": None, "at_start": True})
    out = runner.invoke(app, ["train", config])
    assert out.exit_code == 3, out.output
    health = json.loads((tmp_path / "run" / RunFolder.SUMMARY).read_text())["health"]
    assert health["steps_checked"] == 6  # every step, not the 2 logged ones
    assert health["signals"]["gradients_vanished"] and health["signals"]["loss_at_uniform"]
    assert not health["signals"]["started_at_uniform"]
    assert "(diverged)" in out.output and "% lower" not in out.output and "best" not in out.output.split("eval loss")[1]


def test_a_random_base_that_has_not_moved_yet_is_not_called_diverged(tmp_path, tiny_model_dir):
    """A 2-step smoke run on a random base, first step at learning rate 0 (warmup): its loss starts at chance and
    is still there; compared with its start, that is not a divergence."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    base = tmp_path / "random-base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir)).save_pretrained(base)
    for file in tiny_model_dir.iterdir():
        if "token" in file.name or file.name.endswith(".jinja"):
            shutil.copy(file, base / file.name)
    config = _config_file(tmp_path, base, train={"max_steps": 2, "warmup_steps": 1},
                          eval={"every": None, "at_start": True})
    out = runner.invoke(app, ["train", config])
    assert out.exit_code == 0, out.output
    health = json.loads((tmp_path / "run" / RunFolder.SUMMARY).read_text())["health"]
    assert health["status"] == "ok" and health["steps_checked"] == 2, health
    assert "training finished" in out.output


def test_dry_run_checks_up_to_the_first_step_and_writes_no_artifact(tmp_path, tiny_model_dir, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    config = _config_dict(tmp_path, tiny_model_dir)
    config["train"]["output_dir"] = "runs/../../elsewhere"  # climbs out of the working directory
    config["model"]["trust_remote_code"] = True
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = runner.invoke(app, ["train", str(path), "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "dry run passed" in out.output and "largest batch  8 rows x" in out.output
    assert f"resolves to {tmp_path / 'elsewhere'}, outside the working directory" in out.output
    assert "trust_remote_code is true" in out.output
    run = tmp_path / "elsewhere"
    assert sorted(p.name for p in run.iterdir()) == [RunFolder.DATA_REPORT]  # the audit; no checkpoint or artifact


# ---------------------------------------------------------------------------------------------- the run folder


def test_a_folder_of_unrelated_files_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LorafitError, match="holds no lorafit run") as caught:
        RunFolder.claim(str(tmp_path), overwrite=False)
    assert "notes.txt" in caught.value.what and "--overwrite" in caught.value.fix
    assert RunFolder.claim(str(tmp_path), overwrite=True).path == tmp_path.resolve()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # --overwrite writes beside them, never deletes them
    (tmp_path / RunFolder.HISTORY).write_text("")
    assert RunFolder.claim(str(tmp_path), overwrite=False).foreign_entries() == []  # a run folder is fine


def test_only_the_main_process_writes_run_files(tmp_path):
    RunFolder(tmp_path, main_process=False).write_json(RunFolder.RESULT, {"a": 1})
    RunFolder(tmp_path, main_process=False).append_line(RunFolder.HISTORY, {"step": 1})
    assert list(tmp_path.iterdir()) == []
    previous = os.umask(0o027)
    try:
        write_atomic(tmp_path / "x.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o640
