"""Mixing, hold-out, budgets, order, overlap, cache, audit and the run-folder reports, on real files and tokenizers."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
from conftest import conversation, write_jsonl

from lorafit.config import DataConfig, DataSource, load_config
from lorafit.data import prepare_data
from lorafit.data.mixing import apply_budget, mix
from lorafit.data.sources import Example
from lorafit.errors import LorafitError


def _fake(source: int, n: int, length: int = 5) -> list[Example]:
    return [Example([1] * (length + i % 7), [1] * (length + i % 7), f"s{source}:{i}", f"{source}-{i}") for i in range(n)]


def test_mixing_weights_are_honoured_within_2_percent_on_10000_draws_and_seed_fixes_order():
    sources = [_fake(0, 50), _fake(1, 300), _fake(2, 9000)]  # up-sampled, up-sampled, down-sampled
    weights = [1.0, 2.0, 7.0]
    mixed, report = mix(sources, weights, total=10_000, seed=3, order="shuffle")
    assert len(mixed) == 10_000 and report.drawn == [1000, 2000, 7000]
    counts = Counter(e.identity.split("-")[0] for e in mixed)
    for source, weight in enumerate(weights):
        assert abs(counts[str(source)] / 10_000 - weight / 10) <= 0.02
    # Down-sampling draws distinct rows; up-sampling uses every row before repeating any.
    assert len({e.identity for e in mixed if e.identity.startswith("2-")}) == 7000
    assert Counter(e.identity for e in mixed if e.identity.startswith("0-")) == {f"0-{i}": 20 for i in range(50)}
    # Any window of the shuffled order is mixed too, not source after source.
    first = Counter(e.identity.split("-")[0] for e in mixed[:1000])
    assert abs(first["2"] / 1000 - 0.7) < 0.06
    again, _ = mix(sources, weights, total=10_000, seed=3, order="shuffle")
    other, _ = mix(sources, weights, total=10_000, seed=4, order="shuffle")
    assert [e.identity for e in again] == [e.identity for e in mixed]
    assert [e.identity for e in other] != [e.identity for e in mixed]


def test_curriculum_is_shortest_first_or_by_field():
    sources = [_fake(0, 20), _fake(1, 20, length=3)]
    mixed, _ = mix(sources, [None, None], total=None, seed=0, order="curriculum")
    lengths = [len(e.input_ids) for e in mixed]
    assert lengths == sorted(lengths) and len(mixed) == 40
    ranked = [Example([1] * 3, [1] * 3, "w", str(i), rank=float(10 - i)) for i in range(10)]
    assert [e.rank for e in mix([ranked], [None], total=None, seed=0, order="curriculum")[0]] == list(range(1, 11))


def test_budgets():
    import random

    examples = _fake(0, 100)
    assert len(apply_budget(examples, random.Random(0), max_examples=10, max_tokens=None)) == 10
    within = apply_budget(examples, random.Random(0), max_examples=None, max_tokens=200)
    assert 190 <= sum(len(e.input_ids) for e in within) <= 200


def _rows(prefix: str, n: int) -> list[dict]:
    return [conversation(f"{prefix} question {i}", f"answer {i} " * (1 + i % 3)) for i in range(n)]


def test_prepare_data_holds_out_eval_warns_on_overlap_and_uses_the_cache(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    a = write_jsonl(tmp_path / "a.jsonl", _rows("a", 40))
    b = write_jsonl(tmp_path / "b.jsonl", _rows("b", 10))
    overlap = write_jsonl(tmp_path / "eval.jsonl", _rows("a", 3) + _rows("zz", 2))
    data = DataConfig(train=[DataSource(path=str(a), eval_fraction=0.25, weight=1), DataSource(path=str(b), weight=1)],
                      eval=[DataSource(path=str(overlap))], mix_examples=60)
    prepared = prepare_data(data, tiny_tokenizer, seed=1, batch_size=4, group_by_length=True)
    assert prepared.report["held_out_for_eval"] == 10 and len(prepared.eval_examples) == 15
    assert prepared.report["mix"]["drawn"] == [30, 30] and len(prepared.train_examples) == 60
    held_out = {e.identity for e in prepared.eval_examples[5:]}
    assert not held_out & {e.identity for e in prepared.train_examples}  # held-out rows are never trained on
    # a.jsonl rows 0..2 are in eval.jsonl too: counted, unless they happened to be held out.
    expected_overlap = sum(e.identity in {t.identity for t in prepared.train_examples} for e in prepared.eval_examples)
    assert prepared.report["train_eval_overlap"] == expected_overlap > 0
    assert any("identical to training examples" in w for w in prepared.warnings)

    entries = sorted((tmp_path / "cache" / "data").iterdir())
    assert len(entries) == 3  # one per source
    again = prepare_data(data, tiny_tokenizer, seed=1, batch_size=4, group_by_length=True)
    assert [e.input_ids for e in again.train_examples] == [e.input_ids for e in prepared.train_examples]
    assert [e.labels for e in again.train_examples] == [e.labels for e in prepared.train_examples]
    assert sorted((tmp_path / "cache" / "data").iterdir()) == entries  # served from the cache: nothing new

    # Any change to data bytes, tokenizer, template or data options makes a new entry (never a stale one).
    write_jsonl(b, _rows("b", 10) + _rows("c", 1))
    assert prepare_data(data, tiny_tokenizer, seed=1, batch_size=4, group_by_length=True).report["sources"]["train"][1]["rows"] == 11
    templated = copy.deepcopy(tiny_tokenizer)
    templated.chat_template += "{# same rendering, another template #}"
    prepare_data(data, templated, seed=1, batch_size=4, group_by_length=True)
    prepare_data(data.model_copy(update={"train_on": "all"}), tiny_tokenizer, seed=1, batch_size=4, group_by_length=True)
    assert len(list((tmp_path / "cache" / "data").iterdir())) == 3 + 1 + 3 + 3
    # use_cache=False neither reads nor writes the cache.
    prepare_data(data.model_copy(update={"max_seq_length": 100}), tiny_tokenizer, seed=1, batch_size=4,
                 group_by_length=True, use_cache=False)
    assert len(list((tmp_path / "cache" / "data").iterdir())) == 10


def test_audit_fails_fast_with_a_clear_message(tmp_path, tiny_tokenizer):
    long_prompts = write_jsonl(tmp_path / "long.jsonl", [conversation("word " * 80, "ok") for _ in range(4)])
    fine = write_jsonl(tmp_path / "fine.jsonl", _rows("f", 4))
    data = DataConfig(train=[DataSource(path=str(long_prompts)), DataSource(path=str(fine))], max_seq_length=60,
                      truncation="truncate")
    with pytest.raises(LorafitError) as caught:
        prepare_data(data, tiny_tokenizer, seed=0, batch_size=2, group_by_length=False, use_cache=False)
    message = str(caught.value)
    assert "supervision audit failed" in message
    assert f"{long_prompts}: no supervised token in this train source" in message
    assert f"{long_prompts}: 4 of 4 examples (100%) are longer than data.max_seq_length=60 and were truncated" in message
    assert str(fine) + ":" not in message
    # data.audit: false turns the failure into warnings.
    prepared = prepare_data(data.model_copy(update={"audit": False}), tiny_tokenizer, seed=0, batch_size=2,
                            group_by_length=False, use_cache=False)
    assert len(prepared.audit) == 2 and len(prepared.train_examples) == 4

    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                           "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(LorafitError, match="4 assistant turn\\(s\\) have no supervised end-of-turn token"):
        prepare_data(DataConfig(train=[DataSource(path=str(fine))]), plain, seed=0, batch_size=2,
                     group_by_length=False, use_cache=False)


def test_rows_dropped_for_length_are_announced_per_source(tmp_path, tiny_tokenizer):
    """Issue 23 item 8: `train` prints rows left out for length (per source) where it prints skipped rows
    (training.results.write_data_report); before, they were only in data_report.json."""
    from lorafit.run_folder import RunFolder
    from lorafit.training.results import write_data_report

    a = write_jsonl(tmp_path / "a.jsonl", _rows("a", 8) + [conversation("word " * 80, "ok")] * 2)
    b = write_jsonl(tmp_path / "b.jsonl", _rows("b", 6) + [conversation("word " * 80, "ok")])
    c = write_jsonl(tmp_path / "c.jsonl", _rows("c", 4))
    data = DataConfig(train=[DataSource(path=str(a)), DataSource(path=str(c))], eval=[DataSource(path=str(b))],
                      max_seq_length=60)
    prepared = prepare_data(data, tiny_tokenizer, seed=0, batch_size=2, group_by_length=False, use_cache=False)
    said: list[str] = []
    (tmp_path / "run").mkdir()
    write_data_report(RunFolder(tmp_path / "run"), prepared, said.append)
    assert said == [f"dropped 3 rows longer than data.max_seq_length=60 ({a}: 2 of 10, {b}: 1 of 7; in data_report.json)"]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert [s["dropped_too_long"] for s in report["sources"]["train"] + report["sources"]["eval"]] == [2, 0, 1]

    truncated = prepare_data(data.model_copy(update={"truncation": "truncate", "audit": False}), tiny_tokenizer,
                             seed=0, batch_size=2, group_by_length=False, use_cache=False)
    assert truncated.notes == [f"truncated 3 rows longer than data.max_seq_length=60 to that length ({a}: 2 of 10, "
                               f"{b}: 1 of 7; in data_report.json)"]
    fits = prepare_data(data.model_copy(update={"max_seq_length": 512}), tiny_tokenizer, seed=0, batch_size=2,
                        group_by_length=False, use_cache=False)
    assert fits.notes == []


def test_old_train_on_inputs_key_says_where_it_went(tmp_path):
    (tmp_path / "c.yaml").write_text("data: {train: [{path: t.jsonl}]}\ntrain: {train_on_inputs: true}\n")
    with pytest.raises(LorafitError, match="train.train_on_inputs: moved to data.train_on"):
        load_config(tmp_path / "c.yaml")


def test_data_option_clashes_are_config_errors(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "data:\n  train: [{path: a.jsonl, weight: 2}, {path: b.jsonl}]\n  eval: [{path: c.jsonl, eval_fraction: 0.1}]\n"
        "  order: curriculum\n  packing: bfd\n  chat_template: x\n  chat_template_file: t.jinja\n")
    with pytest.raises(LorafitError) as caught:
        load_config(tmp_path / "c.yaml")
    message = str(caught.value)
    for expected in ("give every source a weight, or none", "data.eval[0].eval_fraction", "give the template once",
                     "curriculum with data.packing: bfd"):
        assert expected in message


@pytest.mark.slow
def test_training_with_packing_mixing_and_skips_writes_reports(tmp_path, tiny_model_dir):
    """Through the CLI in-process: bfd packing, two weighted sources, a skipped row, --no-cache."""
    from typer.testing import CliRunner

    from lorafit.cli import app

    a = write_jsonl(tmp_path / "a.jsonl", _rows("a", 24))
    with open(a, "a") as handle:
        handle.write("{broken\n")
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(6)]
                    + [{"prompt": "word " * 150, "completion": "too long"}])
    (tmp_path / "c.yaml").write_text(
        f"model: {{path: {tiny_model_dir}}}\n"
        "lora: {r: 4, alpha: 8, dropout: 0.0}\n"
        "data:\n  train:\n    - {path: a.jsonl, weight: 3, on_error: skip, max_skip_fraction: 0.1, eval_fraction: 0.2}\n"
        "    - {path: b.jsonl, weight: 1, task_prefix: 'pc: '}\n  mix_examples: 40\n  packing: bfd\n  max_seq_length: 128\n"
        f"train: {{output_dir: {tmp_path / 'run'}, max_steps: 2, batch_size: 2, log_every: 1}}\n"
        "eval: {every: null, at_start: false}\n")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml"), "--no-cache"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    skipped = [json.loads(line) for line in (run / "skipped_rows.jsonl").read_text().splitlines()]
    assert skipped == [{"where": f"{a}:25", "reason": "malformed_json", "message": skipped[0]["message"],
                        "source": str(a)}]
    report = json.loads((run / "data_report.json").read_text())
    assert report["mix"]["drawn"] == [30, 10] and report["held_out_for_eval"] == 5
    assert report["packing"] == "bfd" and report["packed_rows"] < 40
    assert report["sources"]["train"][0]["skipped"] == {"malformed_json": 1}
    summary = json.loads((run / "training_summary.json").read_text())
    assert summary["data"]["train"]["kept"] == 40 and summary["metrics"]["steps"] == 2
    assert "skipped 1 invalid rows" in result.output
    assert f"dropped 1 row longer than data.max_seq_length=128 ({b}: 1 of 7; in data_report.json)" in result.output


def test_curriculum_order_reaches_the_loop_unshuffled(tmp_path, tiny_model_dir, tiny_tokenizer):
    from lorafit.model.loading import load_base_model
    from lorafit.training import batches as plans
    from lorafit.training.objectives import SupervisedObjective
    from lorafit.training.run_setup import collator_for

    rows = [conversation("q " * (1 + (7 * i) % 13), "a " * (1 + i % 3)) for i in range(12)]
    write_jsonl(tmp_path / "t.jsonl", rows)
    config = load_config({"model": {"path": str(tiny_model_dir)},
                          "data": {"train": [{"path": str(tmp_path / "t.jsonl")}], "order": "curriculum",
                                   "packing": "padding_free"},
                          "train": {"output_dir": str(tmp_path / "run"), "batch_size": 3, "max_steps": 1}})
    prepared = prepare_data(config.data, tiny_tokenizer, seed=0, batch_size=3, group_by_length=True, use_cache=False)
    model = load_base_model(config.model, str(tiny_model_dir))
    objective = SupervisedObjective()
    # the loop's own path: its epoch plan for data.order curriculum, through its loader and the run's collator
    order = plans.epoch_order([0] * len(prepared.train), seed=0, epoch=0, kind=plans.order_kind(config), global_batch=3)
    plan = plans.epoch_plan(order, batch_size=3, grad_accum=1)
    collate = plans.CountingCollator(collator_for(config, objective, tiny_tokenizer, model), objective)
    loaded = plans.loader(prepared.train, [b for step in plan.steps for b in step], collate)
    rows_seen = [len(batch["input_ids"][0]) for batch, _ in loaded]
    expected = [len(e.input_ids) for e in prepared.train_examples]
    assert expected == sorted(expected)
    assert rows_seen == [sum(expected[i : i + 3]) for i in range(0, 12, 3)]  # in order, 3 examples per packed row
