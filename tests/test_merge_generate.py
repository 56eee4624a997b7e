"""Merge into a standalone model (exact in fp32, the chosen dtype on disk) and chat-templated generation."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import train_said_twice, write_jsonl
from safetensors import safe_open
from test_cli import lorafit

from lorafit.errors import LorafitError


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, tiny_model_dir):
    """An fp32 LoRA taught to answer 'Say X' with 'X X' and end its turn; artifact.merge writes merged/."""
    return train_said_twice(tmp_path_factory.mktemp("fp32-lora"), tiny_model_dir, artifact={"merge": True})


def _probe_logits(model, tokenizer):
    from lorafit.export.merge import probe_batch, probe_logits

    return probe_logits(model, probe_batch(tokenizer))


def test_fp32_merge_matches_adapter_on_base_and_loads_without_peft(fp32_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = fp32_run.run_dir / "merged"  # written by train because artifact.merge is true
    summary = json.loads((fp32_run.run_dir / "training_summary.json").read_text())
    assert summary["merged_dir"] == str(merged_dir)
    report = json.loads((merged_dir / "merge_report.json").read_text())
    assert report["dtype"] == "fp32" and report["max_abs_logit_diff"] <= 1e-5

    # Independently of the report: adapter on base (peft) vs the merged folder through transformers alone.
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = _probe_logits(PeftModel.from_pretrained(base, fp32_run.adapter_dir), tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (_probe_logits(merged, tokenizer) - reference).abs().max() <= 1e-5
    plain_base = _probe_logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer)
    assert (plain_base - reference).abs().max() > 1e-2  # the adapter changed something, so the match means something

    sums = json.loads((merged_dir / "checksums.json").read_text())["files"]
    files = sorted(p.name for p in merged_dir.iterdir() if p.name != "checksums.json")
    assert sorted(sums) == files and {"model.safetensors", "config.json", "generation_config.json",
                                      "tokenizer.json", "merge_report.json"} <= set(files)
    assert all(hashlib.sha256((merged_dir / n).read_bytes()).hexdigest() == d for n, d in sums.items())


@pytest.mark.slow
def test_bf16_merge_is_bf16_on_disk_through_the_cli(fp32_run, tmp_path):
    out = tmp_path / "merged-bf16"
    done = lorafit("merge", str(fp32_run.adapter_dir), "--out", str(out), "--dtype", "bf16", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        dtypes = {handle.get_slice(name).get_dtype() for name in handle.keys()}
    assert dtypes == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    report = json.loads((out / "merge_report.json").read_text())
    assert 0 < report["max_abs_logit_diff"] <= report["tolerance"]
    stages = [line.split("] ", 1)[1] for line in done.stderr.splitlines() if line.startswith("[")]
    assert stages[0].startswith("loading ") and stages[1:] == [
        "saving the merged model in bf16", "reloading the saved model and comparing its logits with the adapter on its base",
        "writing checksums and moving the merged model into place"]  # what used to be minutes of silence

    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left behind
    from lorafit.export.merge import merge_adapter

    with pytest.raises(LorafitError, match="not an empty folder"):
        merge_adapter(fp32_run.adapter_dir, out)


def test_merge_refuses_a_folder_that_is_not_an_adapter(tmp_path, tiny_model_dir):
    from lorafit.export.merge import merge_adapter

    with pytest.raises(LorafitError, match="not an adapter folder"):
        merge_adapter(tiny_model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_generate_stops_at_the_end_of_turn_token(fp32_run, tiny_model_dir):
    from lorafit.evaluate.generate import load_generator

    generator = load_generator(adapter=fp32_run.adapter_dir)
    end_of_turn = generator.tokenizer.convert_tokens_to_ids("<|end|>")
    assert generator.stop_ids == [end_of_turn]
    assert generator.model.base_model.model.config.use_cache is True
    reply = generator.reply([{"role": "user", "content": "Say red"}], max_new_tokens=40)
    assert reply["stopped_at_end_of_turn"] and reply["token_ids"][-1] == end_of_turn
    assert len(reply["token_ids"]) < 40 and reply["text"] == "red red"

    # The random base never emits <|end|> here: it runs to the limit, so the stop above is the adapter's turn end.
    base = load_generator(model=tiny_model_dir)
    raw = base.reply([{"role": "user", "content": "Say red"}], max_new_tokens=12)
    assert not raw["stopped_at_end_of_turn"] and len(raw["token_ids"]) == 12


def test_generate_and_chat_commands(fp32_run, tmp_path):
    """The commands in-process (typer's runner: real argument parsing, stdin and exit codes, no interpreter start)."""
    from typer.testing import CliRunner

    from lorafit.cli import app

    runner = CliRunner()
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say blue"},
                                                        {"messages": [{"role": "user", "content": "Say green"}]}])
    done = runner.invoke(app, ["generate", "--model", str(fp32_run.run_dir / "merged"), "--file", str(prompts)])
    assert done.exit_code == 0, done.output[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["response"], r["stopped_at_end_of_turn"]) for r in rows] == [("blue blue", True), ("green green", True)]
    counts = [line.split("] ", 1)[1] for line in done.stderr.splitlines() if line.startswith("[") and "prompts" in line]
    # Not a terminal: the start, the end, and a line at most every 10 s between (evaluate/progress.py).
    assert counts == ["prompts 0/2 answered", "prompts 2/2 answered"]

    chat = runner.invoke(app, ["chat", "--adapter", str(fp32_run.adapter_dir)], input="Say black\n/exit\nSay red\n")
    assert chat.exit_code == 0, chat.output[-3000:]
    assert chat.stdout.splitlines() == ["black black"]  # /exit ends the session before the last line

    bad = runner.invoke(app, ["generate", "--model", str(fp32_run.run_dir / "merged")])
    assert bad.exit_code == 1 and "exactly one of --prompt" in bad.output


def test_merge_generate_and_chat_take_a_run_folder(fp32_run, tmp_path):
    """Before: `merge RUN`, `generate --adapter RUN` and `chat --adapter RUN` said "not an adapter folder"."""
    from typer.testing import CliRunner

    from lorafit.cli import app

    runner = CliRunner()
    run = str(fp32_run.run_dir)
    merged = runner.invoke(app, ["merge", run, "--out", str(tmp_path / "m"), "--dtype", "fp32"])
    assert merged.exit_code == 0, merged.output[-3000:]
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["adapter_dir"] == str(fp32_run.adapter_dir) and report["max_abs_logit_diff"] <= 1e-5
    generated = runner.invoke(app, ["generate", "--adapter", run, "--prompt", "Say green"])
    assert generated.exit_code == 0 and generated.stdout.splitlines() == ["green green"], generated.output[-3000:]
    chat = runner.invoke(app, ["chat", "--adapter", run], input="Say blue\n")
    assert chat.exit_code == 0 and chat.stdout.splitlines() == ["blue blue"], chat.output[-3000:]
    # artifact.merge on a run without quantization: no "quantization gap" (it loaded the base a third time for it)
    assert "quantization_gap" not in json.loads((fp32_run.run_dir / "merged" / "merge_report.json").read_text())
