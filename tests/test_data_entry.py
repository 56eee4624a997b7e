"""One data-preparation entry (issue 20 item 3): data/prepare.py picks the objective's kind of row for the run,
`lorafit data inspect`, `plan` and `doctor`; the cache and the audit serve every labelled kind of row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, conversation, write_jsonl
from typer.testing import CliRunner

from lorafit import load_config
from lorafit.cli import app
from lorafit.data import prepare
from lorafit.data.sample_preference import generate_pairs
from lorafit.data.sample_triplets import generate_triplets
from lorafit.errors import LorafitError


def _config(tmp_path: Path, objective: str, rows: list, **data):
    write_jsonl(tmp_path / "rows.jsonl", rows)
    return load_config({"objective": {"type": objective}, "model": {"path": "lorafit:tiny-random"},
                        "data": {"train": [{"path": str(tmp_path / "rows.jsonl")}], **data}})


def _entries(root: Path) -> list[Path]:
    return sorted((root / "data").iterdir()) if (root / "data").is_dir() else []


CASES = {
    "sft": ("sft", lambda: [conversation(f"question {i}?", f"answer {i} " * (1 + i % 4)) for i in range(12)]),
    "dpo": ("preference", lambda: generate_pairs(n_train=12, n_eval=0, seed=3)[0]),
    "contrastive": ("triplets", lambda: generate_triplets(n_train=12, n_eval=0, seed=3)[0]),
    "kto": ("unpaired", lambda: [{"prompt": [{"role": "user", "content": f"q{i}"}],
                                  "completion": [{"role": "assistant", "content": f"a{i}"}], "label": i % 2 == 0}
                                 for i in range(12)]),
}


@pytest.mark.parametrize("objective", list(CASES))
def test_every_labelled_kind_goes_through_the_cache(objective, tmp_path, tiny_tokenizer, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORAFIT_CACHE", str(cache))
    kind, rows = CASES[objective]
    config = _config(tmp_path, objective, rows())
    assert prepare.row_kind(config) == kind
    first = prepare.prepare(config, tiny_tokenizer)
    entries = _entries(cache)
    assert len(entries) == 1, entries  # one source, one entry
    again = prepare.prepare(config, tiny_tokenizer)
    assert _entries(cache) == entries  # served from the cache: nothing new written
    assert again.train_examples == first.train_examples  # token columns and every field, equal
    records = [getattr(e, "record", None) for e in first.train_examples]
    assert [getattr(e, "record", None) for e in again.train_examples] == records  # rows rebuilt (attack eval, KTO)
    uncached = prepare.prepare(config, tiny_tokenizer, use_cache=False)
    assert uncached.train_examples == first.train_examples and _entries(cache) == entries
    # an option that shapes the tokens is part of the key: a new entry, never a stale one
    shorter = load_config({**config.model_dump(mode="json", exclude_defaults=True),
                           "data": {**config.data.model_dump(mode="json", exclude_defaults=True), "max_seq_length": 300}})
    prepare.prepare(shorter, tiny_tokenizer)
    assert len(_entries(cache)) == 2


def test_forward_rows_are_what_each_objective_puts_through_the_model(tmp_path, tiny_tokenizer):
    for objective, widths in (("sft", {1}), ("dpo", {2}), ("contrastive", {3}), ("kto", {1})):
        kind, rows = CASES[objective]
        prepared = prepare.prepare(_config(tmp_path, objective, rows()), tiny_tokenizer, use_cache=False)
        forwarded = prepare.forward_rows(prepared.train_examples, kind)
        assert {len(r) for r in forwarded} == widths and len(forwarded) == len(prepared.train_examples)
        first = prepared.train_examples[0]
        assert forwarded[0][0] == len(first.input_ids)
    assert forwarded  # (the loop ran)


def test_the_triplet_audit_flags_rows_over_the_length_limit(tmp_path, tiny_tokenizer):
    triplets = generate_triplets(n_train=12, n_eval=0, seed=3)[0]
    long_answer = {**triplets[0], "benign": triplets[0]["benign"] + " word" * 400}
    config = _config(tmp_path, "contrastive", [long_answer] * 8 + triplets[:4], max_seq_length=256)
    with pytest.raises(LorafitError, match="supervision audit failed") as raised:
        prepare.prepare(config, tiny_tokenizer, use_cache=False)
    assert any("8 of 12 examples" in d and "longer than data.max_seq_length=256" in d for d in raised.value.details)
    report = prepare.inspect(config, tiny_tokenizer, use_cache=False)  # inspect reports instead of raising
    assert report["kind"] == "triplets" and len(report["audit"]) == 1
    assert "audit: FAILED" in prepare.render(report, colour=False)


@pytest.mark.parametrize("example", ["preference/dpo.yaml", "contrastive/config.yaml"])
def test_data_inspect_and_plan_read_the_objectives_own_rows(example, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = REPO / "examples" / example
    done = CliRunner().invoke(app, ["data", "inspect", str(config), "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["kind"] == {"preference/dpo.yaml": "preference", "contrastive/config.yaml": "triplets"}[example]
    assert report["train_examples"] > 0 and report["audit"] == []

    from lorafit.model.memory_plan import row_shape

    rows = row_shape(load_config(config))
    assert rows.rows_per_example == (2 if report["kind"] == "preference" else 3)  # a pair's / triplet's rows
    assert len(rows.lengths) == report["train_examples"]  # each example as long as its longest row
    assert 0 < max(rows.lengths) <= load_config(config).data.max_seq_length
