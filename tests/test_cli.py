"""The `lorafit` command end to end, as a user runs it: exit codes, messages, files on disk. Real subprocesses
where the process boundary is the point (exit codes, no traceback, no torch import); typer's CliRunner in this
process for the message checks, which would otherwise pay ~11 s of imports each."""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, conversation, write_jsonl
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorafit.cli import app

QUICKSTART_DATA = REPO / "examples" / "data"


def lorafit(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "lorafit", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1500, input=stdin)


def _small_quickstart(tmp_path: Path, model_dir: Path) -> Path:
    lines = (QUICKSTART_DATA / "quickstart_train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:96]) + "\n")
    lines = (QUICKSTART_DATA / "quickstart_eval.jsonl").read_text().splitlines()
    (tmp_path / "eval.jsonl").write_text("\n".join(lines[:16]) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{path: {model_dir}}}\n"
        "lora: {r: 8, alpha: 16, dropout: 0.0}\n"
        "data: {train: [{path: train.jsonl}], eval: [{path: eval.jsonl}], max_seq_length: 256}\n"
        "train: {output_dir: out, max_steps: 6, batch_size: 8, learning_rate: 5.0e-3, log_every: 2}\n"
        "eval: {every: 3}\n"
        "tracking: {report_to: [tensorboard]}\n"
    )
    return config


def test_train_end_to_end_through_the_cli(tmp_path, tiny_model_dir):
    config = _small_quickstart(tmp_path, tiny_model_dir)
    done = lorafit("train", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "training finished" in done.stdout and "eval loss" in done.stdout
    run = tmp_path / "out"
    for name in ("metrics_history.jsonl", "training_summary.json", "result.json"):
        assert (run / name).is_file(), name
    artifact = Path(json.loads((run / "training_summary.json").read_text())["adapter_dir"])
    assert artifact == run / "adapter-v0.1.0" / "final_artifact"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "training_config.yaml"):
        assert (artifact / name).is_file(), name
    assert f"lorafit verify {artifact}" in done.stdout
    verified = invoke("verify", str(artifact), "--base", str(tiny_model_dir), cwd=tmp_path)
    assert verified.exit_code == 0 and verified.stdout.startswith("OK "), verified.output
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    history = [json.loads(line) for line in (run / "metrics_history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == sorted({r["step"] for r in history})  # one object per step
    assert {"step", "loss", "learning_rate", "grad_norm"} <= set(next(r for r in history if "loss" in r))
    assert [r["step"] for r in history if "eval_loss" in r] == [0, 3, 6]
    summary = json.loads((run / "training_summary.json").read_text())
    assert summary["metrics"]["steps"] == 6 and summary["metrics"]["eval_loss_final"] < summary["metrics"]["eval_loss_first"]

    # peft loads the adapter with exactly the keys the file has, and it changes the model's output.
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    inputs = torch.tensor([[1, 5, 9, 40, 77, 300, 12]])
    with torch.no_grad():
        base_logits = base(inputs).logits
    model = PeftModel.from_pretrained(base, artifact)
    saved = load_file(artifact / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    with torch.no_grad():
        adapted_logits = model(inputs).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-3

    # A second run into the same folder is refused, not silently overwritten.
    again = invoke("train", str(config), cwd=tmp_path)
    assert again.exit_code == 1 and "holds a finished run already" in again.stderr and "--overwrite" in again.stderr


def invoke(*args: str, cwd: Path):
    """The command in this process (typer's CliRunner): same code path, exit code and messages as the real
    command, without paying a fresh interpreter's torch import for each check."""
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        os.chdir(previous)


BAD_DATA = [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [\n',
     "bad.jsonl:2: malformed JSON"),
    ('["not", "an", "object"]\n', "bad.jsonl:1: expected a JSON object, got list"),
    ('{"conversation": []}\n', 'bad.jsonl:1: cannot tell the data format from the keys (conversation)'),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', "bad.jsonl:1: messages[0].role is 'robot'"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}\n', "bad.jsonl:1: no assistant turn"),
    ('\n\n', "bad.jsonl: no rows in the file"),
]
BAD_DATA_IDS = ["malformed", "not-object", "missing-field", "unknown-role", "no-assistant", "empty"]


def _bad_data_config(tmp_path: Path, model_dir: Path, content: str) -> None:
    (tmp_path / "bad.jsonl").write_text(content)
    (tmp_path / "c.yaml").write_text(f"model: {{path: {model_dir}}}\ndata: {{train: [{{path: bad.jsonl}}]}}\n"
                                     "train: {output_dir: out}\n")


@pytest.mark.parametrize("command", ["train", "config validate"])
@pytest.mark.parametrize("content, expected", BAD_DATA, ids=BAD_DATA_IDS)
def test_bad_data_is_named_by_file_and_line_without_traceback(tmp_path, tiny_model_dir, content, expected, command):
    _bad_data_config(tmp_path, tiny_model_dir, content)
    done = invoke(*command.split(), "c.yaml", cwd=tmp_path)
    assert done.exit_code == 1, done.output
    assert expected in done.stderr, done.stderr
    assert done.exception is None or isinstance(done.exception, SystemExit)  # no traceback: a clean exit
    assert not (tmp_path / "out").exists()  # refused before the run folder was made


def test_a_bad_config_or_data_is_reported_before_torch_is_imported(tmp_path, tiny_model_dir):
    """`config validate` and the first step of `train` (cli.app.load_command_config) never import torch or transformers."""
    _bad_data_config(tmp_path, tiny_model_dir, '{"messages": [{"role": "robot", "content": "x"}]}\n')
    (tmp_path / "typo.yaml").write_text("data: {train: [{path: bad.jsonl}]}\ntrain: {learnig_rate: 1}\n")
    write_jsonl(tmp_path / "good.jsonl", [conversation("q", "a")])
    (tmp_path / "good.yaml").write_text("data: {train: [{path: good.jsonl}]}\n")
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from lorafit.cli import app\n"
        "from lorafit.cli.app import load_command_config\n"
        "codes = [CliRunner().invoke(app, ['config', 'validate', name]).exit_code\n"
        "         for name in ('c.yaml', 'typo.yaml', 'good.yaml')]\n"
        "load_command_config(__import__('pathlib').Path('good.yaml'), ['train.max_steps=3'])\n"
        "print(codes, sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "[1, 1, 0] []"


def test_a_real_process_exits_1_with_the_message_and_no_traceback(tmp_path, tiny_model_dir):
    """Exit codes as a shell sees them (the in-process tests above cover the messages)."""
    _bad_data_config(tmp_path, tiny_model_dir, '{"messages": [{"role": "robot", "content": "x"}]}\n')
    for command in (["config", "validate"], ["train"]):
        done = lorafit(*command, "c.yaml", cwd=tmp_path)
        assert done.returncode == 1, done.stderr
        assert "bad.jsonl:1: messages[0].role is 'robot'" in done.stderr and "Traceback" not in done.stderr


def test_a_hub_name_is_never_downloaded(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [conversation("q", "a")])
    (tmp_path / "c.yaml").write_text("model: {path: some-org/some-model}\ndata: {train: [{path: t.jsonl}]}\n")
    done = invoke("train", "c.yaml", cwd=tmp_path)
    assert done.exit_code == 1
    assert "not a local model folder and not in the local Hugging Face cache" in done.stderr
    assert done.exception is None or isinstance(done.exception, SystemExit)


def test_missing_model_folder(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [conversation("q", "a")])
    (tmp_path / "c.yaml").write_text("model: {path: ./models/none}\ndata: {train: [{path: t.jsonl}]}\n")
    done = invoke("train", "c.yaml", cwd=tmp_path)
    assert done.exit_code == 1 and "model folder not found" in done.stderr


def test_init_tiny_model_and_version(tmp_path):
    done = invoke("init-tiny-model", "tiny", cwd=tmp_path)
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "tiny" / "config.json").read_text())["model_type"] == "llama"
    refused = invoke("init-tiny-model", "tiny", cwd=tmp_path)
    assert refused.exit_code == 1 and "folder is not empty" in refused.stderr
    assert invoke("--version", cwd=tmp_path).stdout.startswith("lorafit ")


@pytest.mark.slow
def test_quickstart_learns(tmp_path):
    """The bundled default, exactly as `make quickstart` runs it: the adapter answers held-out rows right (valid JSON
    with the right values) where the base does not, and the summary shows both answers side by side (issue 24)."""
    done = lorafit("train", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "quickstart" / "training_summary.json").read_text())
    assert summary["metrics"]["eval_loss_reduction"] >= 0.30
    assert summary["data"]["train"]["kept"] >= 1000 and summary["data"]["eval"]["kept"] >= 100
    base, adapter = summary["generation"]["base"], summary["generation"]["adapter"]
    assert adapter["json_valid"] >= 0.9 and adapter["field_accuracy"] >= 0.8, adapter
    assert base["json_valid"] <= 0.1 and base["field_accuracy"] <= 0.1, base  # the base does not know the task
    samples = summary["generation"]["samples"]
    assert samples and all(s["prompt"] and s["base"] != s["adapter"] for s in samples)
    first = samples[0]
    assert f"input    {first['prompt']}" in done.stdout and f"adapter  {first['adapter']}" in done.stdout
    assert "base -> adapter" in done.stdout
    report = (tmp_path / "runs" / "quickstart" / "report.html").read_text()
    assert "base (no adapter)" in report and html.escape(first["adapter"]) in report
