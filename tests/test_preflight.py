"""`lorafit config validate` and the first seconds of `lorafit train` catch what can be caught before any weight
loads (model/preflight.py): a missing model folder, a folder without weights or tokenizer, an unknown target
module, data whose rows are all over max_seq_length, a missing plugin module. Before, `validate` said "valid" to
all five and `train` found each only after the heavy imports. Each case runs as a real process, timed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, conversation, write_jsonl
from test_cli import invoke

ROWS = [conversation(f"Please repeat the colour {w} twice, separated by a space.", f"{w} {w}")
        for w in ("red", "blue", "green", "black")]


def _case(name: str, tmp_path: Path, model_dir: Path) -> tuple[str, str]:
    """(config text, what the error must say) for one kind of mistake."""
    model, lora, data, extra = f"{{path: {model_dir}}}", "{r: 4}", "{train: [{path: t.jsonl}]}", ""
    if name == "missing folder":
        model, expected = "{path: ./models/none}", "models/none: model folder not found"
    elif name == "missing hub-style folder":
        model, expected = "{path: models/none}", "models/none: not a local model folder and not in the local Hugging Face cache"
    elif name == "no weights or tokenizer":
        (tmp_path / "only-config").mkdir()
        shutil.copy(model_dir / "config.json", tmp_path / "only-config")
        model = "{path: only-config}"
        expected = "only-config: the model folder is incomplete\n  no weights (*.safetensors)\n  no tokenizer files"
    elif name == "unknown target module":
        lora, expected = "{r: 4, target_modules: [q_proj, v_prj]}", "lora.target_modules: ['v_prj'] not found; the model's linear modules are: ['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"
    elif name == "every row too long":
        data, expected = "{train: [{path: t.jsonl}], max_seq_length: 6}", "t.jsonl: at least 4 of 4 train rows (100%) are longer than data.max_seq_length=6 tokens"
    elif name == "missing objective module":
        extra, expected = "objective: {type: 'my_losses.nosuch:Loss'}\n", "objective.type: module 'my_losses.nosuch' not found"
        (tmp_path / "my_losses").mkdir()
        (tmp_path / "my_losses" / "__init__.py").write_text("raise SystemExit('imported: the check must not run it')\n")
    else:
        assert name == "missing callback module"
        extra, expected = "plugins: {callbacks: ['nosuch:Cb']}\n", "plugins.callbacks[0]: module 'nosuch' not found"
    return f"model: {model}\nlora: {lora}\ndata: {data}\ntrain: {{output_dir: out}}\n{extra}", expected


CASES = ["missing folder", "missing hub-style folder", "no weights or tokenizer", "unknown target module",
         "every row too long", "missing objective module", "missing callback module"]


@pytest.mark.parametrize("case", CASES)
def test_config_validate_catches_it_in_seconds_without_loading_weights(case, tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "t.jsonl", ROWS)
    text, expected = _case(case, tmp_path, tiny_model_dir)
    (tmp_path / "c.yaml").write_text(text)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "lorafit", "config", "validate", "c.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "imported: the check must not run it" not in done.stderr
    assert seconds < 20, f"{case}: {seconds:.1f} s (about 1-6 s on an idle 2-core machine)"


@pytest.mark.parametrize("case", CASES)
def test_train_refuses_it_before_the_run_starts(case, tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "t.jsonl", ROWS)
    text, expected = _case(case, tmp_path, tiny_model_dir)
    (tmp_path / "c.yaml").write_text(text)
    done = invoke("train", "c.yaml", cwd=tmp_path)
    assert done.exit_code == 1 and expected in done.stderr, done.output
    assert not (tmp_path / "out").exists()  # nothing loaded, no run folder made


def test_a_valid_config_says_what_was_checked_and_what_could_not_be(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "t.jsonl", ROWS)
    (tmp_path / "callbacks.py").write_text("raise SystemExit('imported')\n")
    (tmp_path / "c.yaml").write_text(f"model: {{path: {tiny_model_dir}}}\nlora: {{target_modules: [q_proj]}}\n"
                                     "data: {train: [{path: t.jsonl}], max_seq_length: 64}\n"
                                     "plugins: {callbacks: ['callbacks:Mine']}\n")
    done = invoke("config", "validate", "c.yaml", cwd=tmp_path)
    assert done.exit_code == 0, done.output
    lines = done.stdout.splitlines()
    assert lines[0] == "c.yaml: valid"
    checked = [line.split("checked", 1)[1].strip() for line in lines if line.startswith("  checked")]
    assert checked[1] == f"model folder {tiny_model_dir}: config.json, weights, tokenizer files"
    assert "1 plugin module(s) found (not imported: importing runs their code)" in checked
    assert "row lengths: 4 rows counted with tokenizer.json against data.max_seq_length=64 (text only: a lower bound)" in checked
    assert "lora.target_modules against the Llama architecture's module names (config.json on the meta device)" in checked
    not_checked = [line.split("not checked", 1)[1].strip() for line in lines if line.startswith("  not checked")]
    assert any("supervision audit" in line for line in not_checked) and any("memory" in line for line in not_checked)
    assert any("plugin classes" in line for line in not_checked)
    assert done.stderr.startswith("lorafit 0.1.0: validating c.yaml")


def test_a_model_folder_with_only_config_json_gets_the_doctors_answer_not_a_traceback(tmp_path, tiny_model_dir):
    """The loaders themselves refuse it (the Python API, eval, merge...), as `lorafit doctor` reports it."""
    from lorafit.config import ModelConfig
    from lorafit.errors import LorafitError
    from lorafit.model.loading import load_base_model, load_tokenizer

    folder = tmp_path / "only-config"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder)
    with pytest.raises(LorafitError, match="the model folder is incomplete") as error:
        load_tokenizer(ModelConfig(path=str(folder)), str(folder))
    assert error.value.details == ["no tokenizer files (one of tokenizer.json, tokenizer.model, spiece.model, "
                                   "sentencepiece.bpe.model, vocab.json, vocab.txt)"]
    assert "sentencepiece or tiktoken" not in error.value.render()
    with pytest.raises(LorafitError, match="the model folder is incomplete") as error:
        load_base_model(ModelConfig(path=str(folder)), str(folder))
    assert error.value.details == ["no weights (*.safetensors)"] and ".safetensors files" in error.value.fix
