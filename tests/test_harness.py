"""`lorafit eval --harness`: lm-evaluation-harness on a trained tiny adapter and its base (the adapter disabled),
offline, over a local multiple-choice task (tests/data/harness/colors.yaml over colors.jsonl); results in the eval
output, in the run folder (harness_results.json) and in report.html."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO, train_said_twice
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.errors import LorafitError
from lorafit.evaluate.harness import harness_eval, require_lm_eval, resolve_tasks

pytest.importorskip("lm_eval")

TASK_DIR = REPO / "tests" / "data" / "harness"


@pytest.fixture(scope="module")
def said_twice(tmp_path_factory, tiny_model_dir):
    """An adapter taught to answer 'Say X' with 'X X' (the colors task asks which of four answers is likeliest)."""
    return train_said_twice(tmp_path_factory.mktemp("harness-lora"), tiny_model_dir)


def test_adapter_and_base_on_a_local_task_file(said_twice):
    tasks = resolve_tasks(str(TASK_DIR / "colors.yaml"))
    data_files = tasks.tasks[0]["dataset_kwargs"]["data_files"]["test"]
    assert data_files == str(TASK_DIR / "colors.jsonl")  # resolved against the YAML's folder, not the cwd
    result = harness_eval(adapter=said_twice.run_dir, model=None, tasks=tasks, chat_template=True)
    colors = result["tasks"]["lorafit_colors"]
    assert colors["n"] == 4 and set(colors["metrics"]) == {"acc", "acc_norm"}
    for row in colors["metrics"].values():
        assert 0.0 <= row["model"] <= 1.0 and 0.0 <= row["base"] <= 1.0
        assert row["delta"] == pytest.approx(row["model"] - row["base"])
        assert row["model_stderr"] is not None  # closed-form stderr of a mean
    # Trained on exactly these four answers, the adapter picks each; the random base does not.
    assert colors["metrics"]["acc"]["model"] == 1.0 and colors["metrics"]["acc"]["base"] < 1.0
    saved = json.loads((said_twice.run_dir / "harness_results.json").read_text())
    assert saved["tasks"]["lorafit_colors"]["metrics"]["acc"]["model"] == 1.0
    report = (said_twice.run_dir / "report.html").read_text()
    assert "lm-evaluation-harness" in report and "lorafit_colors" in report


def test_cli_with_a_tasks_dir_prints_base_vs_adapter(said_twice):
    result = CliRunner().invoke(app, ["eval", "--adapter", str(said_twice.run_dir), "--harness", "lorafit_colors",
                                      "--harness-tasks-dir", str(TASK_DIR), "--harness-chat-template"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("lorafit_colors") and " acc " in line)
    adapter, base, delta, n = row.split()[2:]
    assert float(adapter) == 1.0 and float(base) < 1.0 and float(delta) > 0 and n == "4"
    assert "harness_results.json" in result.output


def test_task_errors_name_the_file_and_the_fix(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("dataset_path: json\n")
    with pytest.raises(LorafitError, match='broken.yaml: field "task" missing'):
        resolve_tasks(str(broken))
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("task: t\nprocess_docs: !function utils.process\n")
    with pytest.raises(LorafitError, match=r"tagged.yaml:2: not a plain YAML task(?s:.*)--harness-tasks-dir"):
        resolve_tasks(str(tagged))
    with pytest.raises(LorafitError, match="--harness missing.yaml: task file not found"):
        resolve_tasks("missing.yaml")


def test_a_built_in_task_without_local_data_fails_offline_with_a_clear_error(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lorafit.evaluate.harness import run_harness

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    from transformers import AutoTokenizer

    with pytest.raises(LorafitError, match=r"arc_easy: a task's data is not available offline(?s:.*)nothing is downloaded"):
        run_harness(model, AutoTokenizer.from_pretrained(tiny_model_dir), resolve_tasks("arc_easy"), with_base=False)


def test_a_missing_extra_says_which_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets when it is not installed
    with pytest.raises(LorafitError, match=r"pip install 'lorafit\[harness\]'"):
        require_lm_eval()
    result = CliRunner().invoke(app, ["eval", "--model", "whatever", "--harness", "lorafit_colors"])
    assert result.exit_code == 1 and "lorafit[harness]" in result.output and "Traceback" not in result.output
