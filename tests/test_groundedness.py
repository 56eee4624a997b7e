"""Retrieval groundedness (docs/eval.md): hand-computed scores, where the context comes from, and one real run whose
base-vs-adapter comparison carries the metric."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, write_jsonl

from lorafit import load_config, train
from lorafit.errors import LorafitError
from lorafit.evaluate import metrics as M
from lorafit.evaluate.examples import EvalExample, read_examples
from lorafit.evaluate.groundedness import groundedness, marked_passages, statements
from lorafit.evaluate.scoring import GenerationSettings, score

CITE = M.DEFAULT_CITATION_PATTERN
TOWER = "The Eiffel Tower is in Paris. It was completed in 1889 and is 330 m tall."


@pytest.mark.parametrize("answer, expected", [
    # content words {eiffel, tower, paris}: all in the context
    ("The Eiffel Tower is in Paris.", 1.0),
    # {eiffel, tower, paris} supported; {painted, green, martians}: 0 of 3
    ("The Eiffel Tower is in Paris. It is painted green by Martians!", 0.5),
    # {paris, hosts, tower, museum}: paris and tower = 2 of 4, exactly the 0.5 threshold -> supported
    ("Paris hosts the tower museum.", 1.0),
    # {paris, hosts, giant, museums}: 1 of 4 -> not supported
    ("Paris hosts giant museums.", 0.0),
    # three statements (a line break ends one too): supported, not, supported
    ("Completed in 1889.\nBuilt by Martians.\n330 m tall", pytest.approx(2 / 3)),
    # "3.5" is not a sentence end (no space after the dot); {3, 5, km, long}: 3 of 4 in "... 3.5 km" -> supported
    ("It is 3.5 km long.", 1.0),
    # nothing stated (empty, or stopwords and punctuation only): 0, saying nothing is not grounded
    ("", 0.0),
    ("It is. Yes!", 0.0),
])
def test_hand_computed_scores(answer, expected):
    context = TOWER if "3.5" not in answer else "The path is 3.5 km."
    assert groundedness(answer, context, CITE) == expected


def test_citation_markers_are_not_words_and_no_context_is_not_applicable():
    # Without removing "[7]" the statement would be {paris, 7}: 1 of 2, still supported; with {paris, 7, 8} it
    # would be 1 of 3 and fail. Markers are removed before counting.
    assert groundedness("Paris [7] [8].", "Paris is in France.", CITE) == 1.0
    assert groundedness("Paris 7 8.", "Paris is in France.", CITE) == 0.0
    assert groundedness("Paris.", None, CITE) is None
    assert groundedness("Paris.", "  \n", CITE) is None
    assert [sorted(s) for s in statements("Sure! Paris [1].", CITE)] == [["sure"], ["paris"]]


def test_passages_marked_in_the_prompt_are_the_context_and_the_question_is_not():
    prompt = "Use the documents.\n[1] The Eiffel Tower is in Paris.\n[2] It opened\nin 1889.\n\nQuestion: what is tall?"
    assert marked_passages([prompt], CITE) == ["[1] The Eiffel Tower is in Paris.", "[2] It opened\nin 1889."]
    example = _example(prompt, context=None)
    assert example.context == "[1] The Eiffel Tower is in Paris.\n\n[2] It opened\nin 1889."
    # restating the question ("tall" is only in the question) is not grounded; the passages' facts are
    assert groundedness("Something is tall. It opened in 1889.", example.context, CITE) == 0.5
    assert _example("No documents here.", context=None).context is None


def test_context_field_wins_over_the_prompt_and_is_checked(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "[1] Rome is in Italy.\nWhere is Paris?"},
                      {"role": "assistant", "content": "Paris is in France."}],
         "context": ["Paris is in France.", "France is in Europe."]},
        {"messages": [{"role": "user", "content": "Where is Paris?"}, {"role": "assistant", "content": "France."}],
         "context": "Paris is the capital of France."},
        {"messages": [{"role": "user", "content": "Where is Paris?"}, {"role": "assistant", "content": "France."}]},
    ]
    first, second, third = read_examples([write_jsonl(tmp_path / "rag.jsonl", rows)])
    assert first.context == "Paris is in France.\n\nFrance is in Europe."
    assert second.context == "Paris is the capital of France." and third.context is None
    settings = GenerationSettings(metrics=("groundedness",))
    scored = [score(e, e.reference, settings)["groundedness"] for e in (first, second, third)]
    assert scored == [1.0, 1.0, None]
    assert M.aggregate([{"groundedness": s} for s in scored], ["groundedness"]) == {"groundedness": {"value": 1.0, "n": 2}}

    bad = write_jsonl(tmp_path / "bad.jsonl", [{**rows[1], "context": {"text": "Paris"}}])
    with pytest.raises(LorafitError) as caught:
        read_examples([bad])
    assert "bad.jsonl:1" in caught.value.what and 'field "context"' in caught.value.what and "got dict" in caught.value.what


def _example(prompt: str, context) -> EvalExample:
    from lorafit.evaluate.examples import example_context

    return EvalExample(prompt=({"role": "user", "content": prompt},), reference="", source="s", where="f:1",
                       context=example_context(context, ({"role": "user", "content": prompt},), "f:1", CITE))


def test_a_run_compares_groundedness_of_base_and_adapter(tmp_path, tiny_model_dir):
    """End to end on the tiny model: eval rows with a context -> the final base-vs-adapter comparison, the results
    file and the report carry groundedness for both, in [0, 1], over every answered example."""
    rows = [json.loads(line) for line in (REPO / "examples/data/quickstart_train.jsonl").read_text().splitlines()]
    eval_rows = [{**row, "context": row["messages"][1]["content"]} for row in rows[40:43]]
    config = load_config({
        "model": {"path": str(tiny_model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": [{"path": str(write_jsonl(tmp_path / "train.jsonl", rows[:16]))}],
                 "eval": [{"path": str(write_jsonl(tmp_path / "eval.jsonl", eval_rows))}], "max_seq_length": 256},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 8, "learning_rate": 5e-3,
                  "log_every": 1, "seed": 1},
        "eval": {"every": None, "at_start": False, "generate_samples": 3, "max_new_tokens": 12},
    })
    result = train(config, progress=False)
    results = json.loads((result.run_dir / "training_results.json").read_text())
    for model in ("base", "adapter"):
        value = results["generation"][model]["groundedness"]
        assert value["n"] == 3 and 0.0 <= value["value"] <= 1.0, (model, value)
        assert result.generation[model]["groundedness"] == value["value"]
    assert "<td>groundedness</td>" in (result.run_dir / "report.html").read_text()
