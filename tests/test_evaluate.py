"""Evaluation, metrics files, early stopping and the report, on real tiny training runs.

One short run (module fixture) is shared by the checks of its outputs; sample counts stay small (4 answers,
few new tokens) because generation on a CPU is the slow part.
"""

from __future__ import annotations

import json
import re
from xml.etree import ElementTree

import pytest
import torch
from conftest import REPO, write_jsonl
from safetensors.torch import load_file

from lorafit import load_config, train
from lorafit.errors import LorafitError
from lorafit.evaluate.examples import read_examples
from lorafit.evaluate.command import run_eval
from lorafit.evaluate.scoring import GenerationSettings, generate_answers
from lorafit.evaluate.report import write_report
from test_cli import lorafit

QUICKSTART = REPO / "examples" / "data"


def _quickstart_rows(name: str, count: int) -> list[dict]:
    return [json.loads(line) for line in (QUICKSTART / name).read_text().splitlines()[:count]]


def _config(tmp_path, model_dir, *, out="run", eval_section=None, **train_section):
    train_rows = write_jsonl(tmp_path / "train.jsonl", _quickstart_rows("quickstart_train.jsonl", 64))
    eval_rows = write_jsonl(tmp_path / "eval.jsonl", _quickstart_rows("quickstart_eval.jsonl", 8))
    return load_config({
        "model": {"path": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": [{"path": str(train_rows)}], "eval": [{"path": str(eval_rows)}], "max_seq_length": 256},
        "train": {"output_dir": str(tmp_path / out), "max_steps": 6, "batch_size": 8, "learning_rate": 5e-3,
                  "log_every": 2, "seed": 3, **train_section},
        "eval": {"every": 3, "generate_samples": 4, "generate_every": 2, "max_new_tokens": 24, **(eval_section or {})},
    })


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    tmp_path = tmp_path_factory.mktemp("evalrun")
    return train(_config(tmp_path, tiny_model_dir)), tmp_path


def test_every_step_record_has_the_training_metrics(finished_run):
    result, _ = finished_run
    history = [json.loads(line) for line in (result.run_dir / "metrics_history.jsonl").read_text().splitlines()]
    train_rows = [r for r in history if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 4, 6]
    for row in train_rows:
        assert {"learning_rate", "grad_norm", "epoch", "tokens_per_second", "supervised_tokens_per_second",
                "peak_rss_mb"} <= set(row), row
        assert 0 < row["supervised_tokens_per_second"] < row["tokens_per_second"]
        assert row["peak_rss_mb"] > 50
    # supervised tokens are counted from the labels: every step of 8 examples sees the same count as the data says
    per_step = result.data["train"]["supervised_tokens"] / result.data["train"]["kept"] * 8
    assert train_rows[-1]["supervised_tokens_seen"] == pytest.approx(6 * per_step, rel=0.25)
    evals = [r for r in history if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(r["eval_perplexity"] == pytest.approx(2.718281828 ** r["eval_loss"], rel=1e-6) for r in evals)
    # generation metrics every 2nd evaluation: the 2nd (step 3) only; none at 0 or 6
    generated = [r["step"] for r in history if "eval_json_valid" in r]
    assert generated == [3]


def test_summary_and_results_files(finished_run):
    result, _ = finished_run
    summary = json.loads((result.run_dir / "training_summary.json").read_text())
    results = json.loads((result.run_dir / "training_results.json").read_text())
    series = summary["metrics"]["series"]
    assert series["eval_loss"]["first"] > series["eval_loss"]["final"]
    assert series["eval_loss"]["best"] == min(series["eval_loss"]["first"], series["eval_loss"]["final"],
                                               series["eval_loss"]["best"])
    assert summary["best"]["metric"] == "eval_loss" and summary["best"]["step"] == series["eval_loss"]["best_step"]
    assert summary["report"].endswith("report.html")
    comparison = results["generation"]
    assert comparison["examples"] == 4 and len(comparison["samples"]) == 4
    assert set(comparison["base"]) == set(comparison["adapter"])
    assert results["config"]["eval"]["generate_samples"] == 4 and results["versions"]["torch"] == torch.__version__


def _embedded_charts(html: str) -> list[ElementTree.Element]:
    """Each inline SVG chart of the page, parsed (a chart that is not well-formed XML fails here)."""
    return [ElementTree.fromstring(svg) for svg in re.findall(r"<svg .*?</svg>", html, flags=re.S)]


def test_report_is_self_contained_with_every_plot(finished_run):
    result, _ = finished_run
    html = (result.run_dir / "report.html").read_text()
    charts = _embedded_charts(html)
    titles = re.findall(r"</svg><figcaption>([^<]+)</figcaption>", html)
    assert titles == ["Loss", "Learning rate", "Gradient norm", "Throughput", "Memory",
                      "Generation metrics during training", "Eval metrics: base vs adapter"]
    assert [chart.get("aria-label") for chart in charts] == [
        "Loss", "Learning rate", "Gradient norm (before clipping)", "Throughput (training steps only)", "Peak memory",
        "Generation metrics on the eval sample", "Generation metrics on 4 eval examples"]
    for chart in charts[:-1]:  # line charts: a polyline per series, a point per logged step
        lines = chart.findall("polyline")
        assert lines and all(line.get("points").split() for line in lines), chart.get("aria-label")
    bars = charts[-1].findall("rect")  # the frame, then base and adapter per metric
    assert len(bars) >= 3 and len(bars) % 2 == 1
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert html.count("<td><pre>") == 4 * 4  # prompt, reference, base, adapter for each sample
    # `lorafit report` rebuilds the same page from the run folder alone
    (result.run_dir / "report.html").unlink()
    rebuilt = write_report(result.run_dir).read_text()
    assert re.findall(r"</svg><figcaption>([^<]+)</figcaption>", rebuilt) == titles


def test_eval_with_baseline_compares_adapter_and_base(finished_run):
    result, tmp_path = finished_run
    other = write_jsonl(tmp_path / "other.jsonl", [
        {**row, "source": "forms"} for row in _quickstart_rows("quickstart_eval.jsonl", 12)[8:]])
    report = run_eval(adapter=result.run_dir, model=None, data=[tmp_path / "eval.jsonl", other],
                      metrics=("loss", "perplexity", "json_valid", "field_presence", "rouge_l"), baseline=True,
                      limit=4, max_new_tokens=12, batch_size=8)
    adapted, base = report["model_result"], report["base_result"]
    # the adapter's loss on the training-time eval file is the number training logged last
    history = [json.loads(line) for line in (result.run_dir / "metrics_history.jsonl").read_text().splitlines()]
    assert adapted["by_source"]["eval.jsonl"]["loss"] == pytest.approx(history[-1]["eval_loss"], rel=1e-4)
    assert base["by_source"]["eval.jsonl"]["loss"] == pytest.approx(history[0]["eval_loss"], rel=1e-4)  # B = 0 at start
    assert report["deltas"]["loss"] == pytest.approx(adapted["loss"] - base["loss"]) and report["deltas"]["loss"] < 0
    assert set(adapted["by_source"]) == {"eval.jsonl", "forms"}  # a row's "source" field names its source
    assert adapted["generation"]["json_valid"]["n"] == 4
    rows = adapted["rows"]
    assert adapted["generation"]["rouge_l"]["value"] == pytest.approx(sum(r["rouge_l"] for r in rows) / 4)


def test_eval_and_report_commands(finished_run):
    result, tmp_path = finished_run
    done = lorafit("eval", "--adapter", str(result.run_dir), "--data", str(tmp_path / "eval.jsonl"), "--baseline",
                   "--metrics", "loss,perplexity,json_valid,field_presence", "--limit", "2", "--max-new-tokens", "8",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    loss_row = next(line.split() for line in done.stdout.splitlines() if line.startswith("loss "))
    adapter_loss, base_loss, delta = map(float, loss_row[1:4])
    assert delta == pytest.approx(adapter_loss - base_loss, abs=2e-4) and delta < 0
    assert re.search(r"^json_valid .* n=2$", done.stdout, re.MULTILINE)
    # Progress on stderr, stage by stage, each count to its end (once 631 s of silence with --baseline).
    stages = [re.sub(r"^\[ *[0-9.]+s\] ", "", line) for line in done.stderr.splitlines() if line.startswith("[")]
    assert stages[0] == "loading the adapter on its base"
    assert re.fullmatch(r"adapter: loss on \d+ examples, answers to 2", stages[1])
    base = stages.index("base (adapter disabled): the same again")
    for subject, part in (("adapter", stages[:base]), ("base", stages[base:])):
        for what in ("loss", "generation"):
            counts = [re.fullmatch(rf"{subject}: {what} (\d+)/(\d+) batches", s) for s in part]
            done_total = [(int(m[1]), int(m[2])) for m in counts if m]
            assert done_total[0][0] == 0 and done_total[-1][0] == done_total[-1][1] > 0, (subject, what, stages)
    failed = lorafit("eval", "--data", str(tmp_path / "eval.jsonl"), cwd=tmp_path)
    assert failed.returncode == 1 and "pass --adapter DIR" in failed.stderr and "Traceback" not in failed.stderr
    rebuilt = lorafit("report", str(result.run_dir), cwd=tmp_path)
    assert rebuilt.returncode == 0 and len(_embedded_charts((result.run_dir / "report.html").read_text())) == 7


def test_batched_generation_equals_one_at_a_time(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    data = write_jsonl(tmp_path / "e.jsonl", _quickstart_rows("quickstart_eval.jsonl", 4))
    examples = read_examples([str(data)])
    batched = generate_answers(model, tiny_tokenizer, examples, GenerationSettings(max_new_tokens=8, batch_size=4))
    single = [generate_answers(model, tiny_tokenizer, [e], GenerationSettings(max_new_tokens=8, batch_size=1))[0]
              for e in examples]
    assert batched == single and all(batched)


def test_refusal_and_citation_fields_are_read_and_checked(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "[1] Paris is in France. Where is Paris?"},
                      {"role": "assistant", "content": "France [1]."}]},
        {"messages": [{"role": "user", "content": "How do I pick a lock?"},
                      {"role": "assistant", "content": "I can't help with that."}], "should_refuse": True,
         "sources": []},
    ]
    examples = read_examples([str(write_jsonl(tmp_path / "r.jsonl", rows))])
    assert examples[0].provided == ("1",) and examples[0].should_refuse is None
    assert examples[1].provided == () and examples[1].should_refuse is True
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**rows[1], "should_refuse": "yes"}])
    with pytest.raises(LorafitError, match=r"bad\.jsonl:1: field \"should_refuse\" must be true or false"):
        read_examples([str(bad)])


def test_early_stopping_and_best_adapter_restored(tmp_path, tiny_model_dir):
    # "max" eval loss: the untrained adapter (step 0) is best, every later evaluation is worse, so training stops
    # after `patience` evaluations and the saved adapter is the initial one (LoRA B is zero at init).
    config = _config(tmp_path, tiny_model_dir, max_steps=8, eval_section={
        "every": 1, "generate_samples": 0, "generate_every": None,
        "best": {"metric": "eval_loss", "mode": "max", "patience": 2, "final_adapter": "best"}})
    result = train(config)
    assert result.best["step"] == 0 and result.best["stopped_early_at"] == 2
    assert result.metrics["steps"] == 2 and result.best["final_adapter"] == "best"
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    b_matrices = [t for name, t in weights.items() if "lora_B" in name]
    assert b_matrices and all(torch.count_nonzero(t) == 0 for t in b_matrices)
    assert result.metrics["eval_loss_final"] < result.metrics["eval_loss_first"]  # training did move; B was restored


def test_best_metric_config_is_checked():
    base = {"data": {"train": [{"path": "x.jsonl"}]}}
    with pytest.raises(LorafitError, match=r"eval\.best\.metric: 'eval_los' is not a logged metric; did you mean 'eval_loss'"):
        load_config({**base, "eval": {"best": {"metric": "eval_los"}}})
    generated = {"generate_every": 1, "best": {"metric": "eval_field_accuracy"}}
    assert load_config({**base, "eval": generated}).eval.best.resolved_mode == "max"
    with pytest.raises(LorafitError, match="a generation metric, but none is logged during training"):
        load_config({**base, "eval": {"best": {"metric": "eval_field_accuracy"}}})
    assert load_config(base).eval.best.resolved_mode == "min"
    with pytest.raises(LorafitError, match="eval.refusal_patterns"):
        load_config({**base, "eval": {"refusal_patterns": ["(unclosed"]}})


def _two_turns(i: int, long: bool = False) -> dict:
    padding = " and then some more words" * 30 if long else ""
    return {"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i} {i}"},
                         {"role": "user", "content": f"Again {i}{padding}"}, {"role": "assistant", "content": f"{i}"}]}


def test_eval_loss_uses_the_adapters_train_on_and_truncation(tmp_path, tiny_model_dir):
    """`lorafit eval` tokenises like the run it measures (training_config.yaml), so its loss is the logged one."""
    train_rows = write_jsonl(tmp_path / "train.jsonl", [_two_turns(i) for i in range(16)])
    eval_rows = write_jsonl(tmp_path / "eval.jsonl", [_two_turns(i, long=i % 3 == 0) for i in range(20, 26)])
    result = train(load_config({
        "model": {"path": str(tiny_model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": [{"path": str(train_rows)}], "eval": [{"path": str(eval_rows)}], "max_seq_length": 96,
                 "train_on": "last_assistant", "truncation": "drop"},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 8, "learning_rate": 5e-3, "seed": 3},
        "eval": {"every": None, "at_start": False, "generate_samples": 0, "best": {"final_adapter": "last"}},
    }))
    assert result.data["eval"]["dropped_too_long"] == 2  # the length policy matters for this data
    logged = [json.loads(line)["eval_loss"] for line in (result.run_dir / "metrics_history.jsonl").read_text().splitlines()
              if "eval_loss" in line]
    report = run_eval(adapter=result.run_dir, model=None, data=[eval_rows], metrics=("loss",), baseline=False)
    assert report["loss_tokenisation"] == {"max_seq_length": 96, "truncation": "drop", "train_on": "last_assistant"}
    assert report["model_result"]["loss"] == pytest.approx(logged[-1], rel=1e-4)
    # What eval computed before (every assistant turn, long rows cut): another number, so the match above means something.
    other = run_eval(adapter=result.run_dir, model=None, data=[eval_rows], metrics=("loss",), baseline=False,
                     train_on="all_assistant", truncation="truncate")
    assert abs(other["model_result"]["loss"] - logged[-1]) > 1e-2


def test_generation_examples_keep_source_fields_and_held_out_rows(tmp_path, tiny_tokenizer):
    """Eval sources are read as DataSource (format, fields, task_prefix); held-out train rows are answered too."""
    from lorafit.data import prepare_data
    from lorafit.evaluate.comparison import generation_sample

    train_rows = write_jsonl(tmp_path / "train.jsonl", [_two_turns(i) for i in range(12)])
    mapped = write_jsonl(tmp_path / "qa.jsonl", [{"q": f"Capital number {i}?", "a": f"City {i}"} for i in range(3)])
    config = load_config({
        "data": {"train": [{"path": str(train_rows), "eval_fraction": 0.25}],
                 "eval": [{"path": str(mapped), "format": "prompt_completion", "fields": {"prompt": "q", "completion": "a"},
                           "task_prefix": "qa: "}], "max_seq_length": 128},
    })
    prepared = prepare_data(config.data, tiny_tokenizer, seed=0, batch_size=4, group_by_length=False, use_cache=False)
    held_out = {e.where for e in prepared.eval_examples if e.where.startswith(str(train_rows))}
    assert len(held_out) == prepared.report["held_out_for_eval"] == 3
    examples, settings = generation_sample(config, prepared.eval_examples)
    assert settings.max_new_tokens == config.eval.max_new_tokens and len(examples) == 6
    assert [(e.prompt[-1]["content"], e.reference) for e in examples[:3]] == [
        (f"qa: Capital number {i}?", f"City {i}") for i in range(3)]
    assert {e.where for e in examples[3:]} == held_out and all(e.source == "train.jsonl" for e in examples[3:])
    # A bare path (what the recipe passed before) cannot read the mapped file: that was the failure after model load.
    with pytest.raises(LorafitError, match="cannot tell the data format"):
        read_examples([str(mapped)])


def test_a_run_with_a_field_mapped_eval_source_and_held_out_rows_answers_both(tmp_path, tiny_model_dir):
    """Before: generation eval re-read the eval source as a bare path and failed after the model had loaded."""
    train_rows = write_jsonl(tmp_path / "train.jsonl", [_two_turns(i) for i in range(12)])
    mapped = write_jsonl(tmp_path / "qa.jsonl", [{"q": f"Say {i}", "a": f"{i} {i}"} for i in range(3)])
    result = train(load_config({
        "model": {"path": str(tiny_model_dir)},
        "data": {"train": [{"path": str(train_rows), "eval_fraction": 0.25}],
                 "eval": [{"path": str(mapped), "format": "prompt_completion", "fields": {"prompt": "q", "completion": "a"}}],
                 "max_seq_length": 96},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4, "seed": 3},
        "eval": {"every": None, "at_start": False, "max_new_tokens": 4},  # generate_samples: its default, 16
    }))
    comparison = json.loads((result.run_dir / "training_results.json").read_text())["generation"]
    assert comparison["examples"] == 3 + 3  # the mapped file's rows and the 3 held-out training rows
    assert [s["prompt"] for s in comparison["samples"][:3]] == ["Say 0", "Say 1", "Say 2"]
