"""The config: shipped examples validate, and every kind of mistake is caught with a useful message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.config import Config, apply_overrides, default_config_path, load_config, schema_reference
from lorafit.errors import LorafitError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "examples").rglob("*.yaml")) + [default_config_path()]

MINIMAL = "data:\n  train: [{path: train.jsonl}]\n"


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_shipped_config_validates_and_its_data_exists(path):
    config = load_config(path)
    for source in [*config.data.train, *config.data.eval]:
        assert Path(source.path).is_file(), source.path


def test_defaults_and_relative_paths_resolve_against_the_config_folder(tmp_path):
    config = load_config(_write(tmp_path, MINIMAL))
    assert config.data.train[0].path == str(tmp_path / "train.jsonl")
    assert config.lora.r == 16 and config.train.scheduler == "cosine" and config.model.trust_remote_code is False


def test_typo_gets_a_suggestion(tmp_path):
    path = _write(tmp_path, MINIMAL + "train:\n  learnig_rate: 1.0e-4\n")
    with pytest.raises(LorafitError) as caught:
        load_config(path)
    assert "train.learnig_rate: unknown key — did you mean train.learning_rate?" in str(caught.value)


def test_unknown_section_lists_the_valid_ones(tmp_path):
    with pytest.raises(LorafitError) as caught:
        load_config(_write(tmp_path, MINIMAL + "optimiser: {}\n"))
    assert "optimiser: unknown key" in str(caught.value)


def test_all_errors_are_reported_at_once(tmp_path):
    text = MINIMAL + "lora:\n  r: -1\n  dropout: 2\ntrain:\n  batch_size: eight\n  scheduler: exp\n"
    with pytest.raises(LorafitError) as caught:
        load_config(_write(tmp_path, text))
    message = str(caught.value)
    assert "4 problems" in message
    for expected in ("lora.r:", "lora.dropout:", "train.batch_size:", "train.scheduler:", "'eight'", "'exp'"):
        assert expected in message


def test_duplicate_yaml_key_is_an_error_with_both_lines(tmp_path):
    path = _write(tmp_path, MINIMAL + "train:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(LorafitError) as caught:
        load_config(path)
    assert f"{path}:5: duplicate key 'seed' (first given on line 4)" in str(caught.value)


def test_duplicate_json_key_is_an_error(tmp_path):
    path = _write(tmp_path, '{"data": {"train": [{"path": "a.jsonl"}]}, "data": {}}', "config.json")
    with pytest.raises(LorafitError, match="duplicate key 'data'"):
        load_config(path)


def test_cross_field_checks(tmp_path):
    text = MINIMAL + "train:\n  epochs: 1\n  max_steps: 10\n  warmup_ratio: 0.1\n  warmup_steps: 5\n"
    with pytest.raises(LorafitError) as caught:
        load_config(_write(tmp_path, text))
    assert "epochs and train.max_steps are both set" in str(caught.value)


def test_warmup_given_twice(tmp_path):
    with pytest.raises(LorafitError, match="warmup is given twice"):
        load_config(_write(tmp_path, MINIMAL + "train:\n  warmup_ratio: 0.1\n  warmup_steps: 5\n"))


@pytest.mark.parametrize("in_file, override, expected", [
    ("epochs: 2", "train.max_steps=100", {"max_steps": 100, "epochs": None}),
    ("max_steps: 100", "train.epochs=3", {"max_steps": None, "epochs": 3}),
    ("warmup_ratio: 0.1", "train.warmup_steps=5", {"warmup_steps": 5, "warmup_ratio": None}),
    ("warmup_steps: 5", "train.warmup_ratio=0.2", {"warmup_steps": None, "warmup_ratio": 0.2}),
    ("epochs: 2", "train.max_steps=null", {"max_steps": None, "epochs": 2}),  # null replaces nothing
])
def test_an_override_of_one_exclusive_key_replaces_the_other_from_the_file(tmp_path, in_file, override, expected):
    """The README's `load_config("my_run.yaml", ["train.max_steps=100"])` on a config with `epochs: 2`."""
    path = _write(tmp_path, MINIMAL + f"train:\n  {in_file}\n")
    train = load_config(path, [override]).train
    assert {key: getattr(train, key) for key in expected} == expected


def test_both_exclusive_keys_in_one_source_are_still_a_clash(tmp_path):
    path = _write(tmp_path, MINIMAL + "train:\n  epochs: 2\n")
    with pytest.raises(LorafitError, match="epochs and train.max_steps are both set"):
        load_config(path, ["train.max_steps=10", "train.epochs=1"])
    with pytest.raises(LorafitError, match="epochs and train.max_steps are both set"):
        load_config(_write(tmp_path, MINIMAL + "train: {epochs: 2, max_steps: 5}\n", "both.yaml"), ["train.seed=1"])
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    both = _write(tmp_path, MINIMAL.replace("data:\n", "data:\n  chat_template: '{{ x }}'\n"), "tpl.yaml")
    assert load_config(both, [f"data.chat_template_file={template}"]).data.chat_template is None


def test_a_tracker_that_is_not_installed_is_a_config_error(tmp_path, monkeypatch):
    """tensorboard is an extra now: asking for it without it fails at validation, naming the extra to install."""
    path = _write(tmp_path, MINIMAL + "tracking: {report_to: [tensorboard]}\n")
    monkeypatch.setitem(__import__("sys").modules, "tensorboard", None)  # what find_spec sees when not installed
    with pytest.raises(LorafitError) as caught:
        load_config(path)
    # The command that works: lorafit is installed from its checkout, `pip install 'lorafit[x]'` finds no package.
    assert ("tracking.report_to: tensorboard is not installed; install the extra: .venv/bin/python -m pip install -e "
            "'.[tensorboard]' in the lorafit checkout") in str(caught.value)
    assert load_config(path, ["tracking.report_to=[]"]).tracking.report_to == []


def test_set_overrides_are_typed_and_validated(tmp_path):
    path = _write(tmp_path, MINIMAL)
    config = load_config(path, ["train.learning_rate=1e-4", "lora.r=32", "lora.target_modules=[q_proj, v_proj]",
                                "data.train.0.path=other.jsonl", "quant.bits=null"])
    assert config.train.learning_rate == pytest.approx(1e-4) and isinstance(config.train.learning_rate, float)
    assert config.lora.r == 32 and config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.train[0].path == str(tmp_path / "other.jsonl")
    with pytest.raises(LorafitError, match="lora.r: Input should be a valid integer"):
        load_config(path, ["lora.r=big"])
    with pytest.raises(LorafitError, match="did you mean lora.alpha"):
        load_config(path, ["lora.alpah=8"])
    with pytest.raises(LorafitError, match="expected KEY=VALUE"):
        load_config(path, ["lora.r"])


def test_overrides_do_not_mutate_the_callers_dict():
    original = {"train": {"seed": 1}}
    apply_overrides(original, ["train.seed=2"])
    assert original == {"train": {"seed": 1}}


def test_config_is_frozen(tmp_path):
    config = load_config(_write(tmp_path, MINIMAL))
    with pytest.raises(Exception):
        config.train.seed = 3  # type: ignore[misc]


def test_show_round_trips(tmp_path):
    config = load_config(_write(tmp_path, MINIMAL))
    again = load_config(_write(tmp_path, config.to_yaml(), "again.yaml"))
    assert again == config


def test_schema_reference_lists_every_key():
    table = schema_reference()
    for key in ("model.path", "lora.target_modules", "train.learning_rate", "eval.every", "tracking.report_to"):
        assert f"`{key}`" in table


def test_docs_config_reference_is_current():
    """docs/config.md embeds the generated table; regenerate with `python scripts/gen_config_doc.py` if this fails."""
    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert schema_reference() in text


runner = CliRunner()


def test_cli_validate_exit_codes_and_no_traceback(tmp_path):
    good = _write(tmp_path, MINIMAL)
    result = runner.invoke(app, ["config", "validate", str(good)])
    assert result.exit_code == 1 and "train.jsonl: data file not found" in result.output  # validate reads the data too
    _write(tmp_path, json.dumps({"prompt": "q", "completion": "a"}) + "\n", "train.jsonl")
    result = runner.invoke(app, ["config", "validate", str(good)])
    assert result.exit_code == 0, result.output
    bad = _write(tmp_path, MINIMAL + "lora: {rank: 8}\n", "bad.yaml")
    result = runner.invoke(app, ["config", "validate", str(bad)])
    assert result.exit_code == 1
    assert "lora.rank: unknown key" in result.output and "Traceback" not in result.output
    missing = runner.invoke(app, ["config", "validate", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 1 and "config file not found" in missing.output


def test_cli_show_prints_resolved_yaml(tmp_path):
    result = runner.invoke(app, ["config", "show", str(_write(tmp_path, MINIMAL)), "--set", "lora.r=4"])
    assert result.exit_code == 0, result.output
    import yaml

    shown = yaml.safe_load(result.stdout)
    assert shown["lora"]["r"] == 4 and shown["train"]["learning_rate"] == 2e-4
    assert Config.model_validate(shown).lora.r == 4


def test_json_config_is_accepted(tmp_path):
    path = _write(tmp_path, json.dumps({"data": {"train": [{"path": "t.jsonl"}]}, "lora": {"r": 8}}), "c.json")
    assert load_config(path).lora.r == 8
