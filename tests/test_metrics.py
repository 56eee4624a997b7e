"""Generation metrics against values computed by hand (the arithmetic is in each comment)."""

from __future__ import annotations

import math

import pytest

from lorafit.evaluate import metrics as M

REF = '{"name": "Ana Lopez", "age": 41, "city": "Boston", "job": "architect"}'


def test_exact_match_ignores_surrounding_and_repeated_whitespace_only():
    assert M.exact_match("  Paris \n", "Paris") == 1.0
    assert M.exact_match("a  b", "a b") == 1.0
    assert M.exact_match("paris", "Paris") == 0.0  # case counts
    assert M.exact_match("Paris.", "Paris") == 0.0


def test_rouge_l_by_hand():
    # pred words: the cat sat on mat (5); ref: the cat is on the mat (6); LCS = the cat on mat = 4
    # P = 4/5, R = 4/6, F = 2PR/(P+R) = 2*0.8*0.6667/1.4667 = 0.72727...
    assert M.rouge_l("The cat sat on mat", "the cat is on the mat") == pytest.approx(8 / 11)
    assert M.rouge_l("a b c", "a b c") == 1.0
    assert M.rouge_l("x y", "a b") == 0.0
    assert M.rouge_l("", "") == 1.0
    assert M.rouge_l("", "a") == 0.0
    # order matters for LCS: pred b a, ref a b -> LCS 1, P = R = 1/2, F = 1/2
    assert M.rouge_l("b a", "a b") == pytest.approx(0.5)


def test_lcs_length():
    assert M.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # textbook example (CLRS)
    assert M.lcs_length([], ["a"]) == 0


def test_json_valid():
    assert M.json_valid('{"a": 1}') == 1.0
    assert M.json_valid('  [1, 2]\n') == 1.0
    assert M.json_valid("null") == 1.0
    assert M.json_valid('```json\n{"a": 1}\n```') == 1.0
    assert M.json_valid('{"a": 1') == 0.0
    assert M.json_valid('Sure! {"a": 1}') == 0.0
    assert M.json_valid("") == 0.0


def test_json_schema_subset():
    schema = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
              "properties": {"name": {"type": "string", "minLength": 1}, "age": {"type": "integer", "minimum": 0}}}
    assert M.json_schema('{"name": "Ana", "age": 41}', schema) == 1.0
    assert M.json_schema('{"name": "Ana", "age": "41"}', schema) == 0.0  # string where integer is required
    assert M.json_schema('{"name": "Ana"}', schema) == 0.0  # missing required
    assert M.json_schema('{"name": "Ana", "age": 1, "x": 0}', schema) == 0.0  # additional property
    assert M.json_schema('{"name": "Ana", "age": true}', schema) == 0.0  # bool is not an integer
    assert M.json_schema("not json", schema) == 0.0
    assert M.json_schema('{"a": 1}', None) is None
    assert M.schema_errors([1, "x"], {"type": "array", "items": {"type": "number"}, "maxItems": 1}) == [
        "$[1]: expected number, got str", "$: 2 items"]
    assert M.schema_errors("b", {"enum": ["a"]}) == ["$: 'b' not in ['a']"]


def test_json_schema_combinators_and_refs_are_enforced():
    """anyOf, oneOf, allOf, not, $ref: a subset validator ignored them, so every answer passed such a schema."""
    schema = {
        "$defs": {"person": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}},
        "anyOf": [{"$ref": "#/$defs/person"}, {"type": "array", "items": {"$ref": "#/$defs/person"}}],
    }
    assert M.json_schema('{"name": "Ana"}', schema) == 1.0
    assert M.json_schema('[{"name": "Ana"}, {"name": "Rui"}]', schema) == 1.0
    assert M.json_schema('{"nome": "Ana"}', schema) == 0.0  # neither branch: no name
    assert M.json_schema('[{"name": 7}]', schema) == 0.0  # $ref inside items
    assert M.json_schema("42", {"oneOf": [{"type": "integer"}, {"minimum": 10}]}) == 0.0  # both match: not one
    assert M.json_schema("7", {"oneOf": [{"type": "integer"}, {"minimum": 10}]}) == 1.0
    assert M.json_schema('"x"', {"allOf": [{"type": "string"}, {"minLength": 2}]}) == 0.0
    assert M.json_schema('{"a": 1}', {"not": {"required": ["a"]}}) == 0.0
    assert M.schema_errors({"age": "41"}, {"properties": {"age": {"type": "integer"}}}) == [
        "$.age: expected integer, got str"]


def test_an_invalid_schema_file_is_refused_before_any_answer(tmp_path):
    from lorafit.errors import LorafitError
    from lorafit.evaluate.scoring import load_json_schema

    path = tmp_path / "schema.json"
    path.write_text('{"type": "objekt"}')
    with pytest.raises(LorafitError, match=r"schema.json: not a valid JSON schema: \$.type: 'objekt' is not valid"):
        load_json_schema(str(path))
    path.write_text('{"type": "object", "required": ["a"]}')
    assert load_json_schema(str(path)) == {"type": "object", "required": ["a"]}


# (prediction, reference) pairs for ROUGE-L parity with Google's rouge-score package.
ASCII_PAIRS = [
    ("The cat sat on mat", "the cat is on the mat"), ("a b c", "a b c"), ("x y", "a b"), ("b a", "a b"),
    ("police killed the gunman", "the gunman killed police"), ("Hello, world!", "hello world"),
    ('{"name": "Ana", "age": 41}', '{"name": "Ana Lopez", "age": 41}'), ("It's 3:45pm now.", "it is 3 45 pm now"),
    ("one two three four five", "five four three two one"), ("New York-based firm", "a firm based in new york"),
    ("I can't help with that.", "I cannot help with that"), ("2 + 2 = 4", "2+2=4"),
    ("the the the", "the"), ("A B A B A", "B A B"), ("long answer " * 10, "long answer"),
]
UNICODE_PAIRS = [
    ("Café au lait à Paris", "un café à Paris"), ("Straße und Übermut", "die straße"), ("naïve résumé", "resume naive"),
    ("東京 は 日本 の 首都", "日本 の 首都 は 東京"), ("Привет мир", "привет, мир!"), ("ελληνικά κείμενα", "κείμενα"),
]


class _LorafitWords:
    """lorafit's word split (lower-cased \\w+, Unicode letters kept) as a rouge-score tokenizer."""

    def tokenize(self, text):
        return M.words(text)


def test_rouge_l_equals_the_rouge_score_package():
    from rouge_score.rouge_scorer import RougeScorer

    # ASCII text: rouge-score's own tokenizer splits on the same boundaries, so the scores are equal as they are.
    default = RougeScorer(["rougeL"])
    for prediction, reference in ASCII_PAIRS:
        assert M.rouge_l(prediction, reference) == pytest.approx(
            default.score(reference, prediction)["rougeL"].fmeasure, abs=1e-12), (prediction, reference)
    # Non-ASCII text: rouge-score's default tokenizer drops every non-[a-z0-9] letter ("café" -> "caf", Cyrillic
    # -> nothing); lorafit keeps Unicode words. With lorafit's word split, the LCS and F1 are the package's.
    words = RougeScorer(["rougeL"], tokenizer=_LorafitWords())
    for prediction, reference in UNICODE_PAIRS:
        assert M.rouge_l(prediction, reference) == pytest.approx(
            words.score(reference, prediction)["rougeL"].fmeasure, abs=1e-12), (prediction, reference)
    assert M.rouge_l("Привет мир", "привет, мир!") == 1.0 and default.score("привет, мир!", "Привет мир")["rougeL"].fmeasure == 0.0


def test_field_presence_and_accuracy_by_hand():
    assert M.field_accuracy(REF, REF) == 1.0 and M.field_presence(REF, REF) == 1.0
    # right keys, values: name right, age as a string (wrong type), city wrong, job right -> 2/4
    pred = '{"name": "Ana Lopez", "age": "41", "city": "Paris", "job": "architect"}'
    assert M.field_presence(pred, REF) == 1.0
    assert M.field_accuracy(pred, REF) == 0.5
    # not valid JSON (age has no value): pairs found are name, age="city", city, job -> 4/4 present;
    # values right: city=Boston only -> 1/4
    broken = '{"name": "Elena Petrov", "age": "city": "city": "Boston", "job": "designer"}'
    assert M.json_valid(broken) == 0.0
    assert M.field_presence(broken, REF) == 1.0
    assert M.field_accuracy(broken, REF) == 0.25
    # two of four keys, one right -> presence 2/4, accuracy 1/4
    assert M.field_presence('{"name": "Ana Lopez", "job": "pilot"}', REF) == 0.5
    assert M.field_accuracy('{"name": "Ana Lopez", "job": "pilot"}', REF) == 0.25
    assert M.field_accuracy("no fields here", REF) == 0.0
    assert M.field_accuracy("anything", "plain text reference") is None
    assert M.field_presence("anything", "[1, 2]") is None


def test_citation_coverage():
    assert M.citations("See [1] and [doc-7], not [ ].") == ["1", "doc-7"]
    assert M.citation_coverage("Paris is big [2].", ["1", "2"]) == 1.0
    assert M.citation_coverage("Paris is big [3].", ["1", "2"]) == 0.0  # cites a source it was not given
    assert M.citation_coverage("Paris is big.", ["1"]) == 0.0
    assert M.citation_coverage("Paris [1].", []) is None
    # a pattern without a group: the whole match is the id
    assert M.citation_coverage("see (src:a)", ["(src:a)"], pattern=r"\(src:\w+\)") == 1.0


def test_refusal_correct():
    assert M.is_refusal("I'm sorry, but I can't help with that.")
    assert M.is_refusal("i cannot do this")
    assert not M.is_refusal("The capital is Paris.")
    assert M.refusal_correct("I can't share that.", True) == 1.0
    assert M.refusal_correct("Here it is.", True) == 0.0
    assert M.refusal_correct("I can't share that.", False) == 0.0  # refused a question it should answer
    assert M.refusal_correct("Here it is.", False) == 1.0
    assert M.refusal_correct("Here it is.", None) is None
    assert M.refusal_correct("NOPE.", True, patterns=[r"^nope\b"]) == 1.0  # configurable detection


def test_perplexity_and_aggregate():
    assert M.perplexity(math.log(20.0)) == pytest.approx(20.0)
    assert M.perplexity(1e9) == pytest.approx(math.exp(50))
    rows = [{"a": 1.0, "b": None}, {"a": 0.0, "b": 0.5}, {"a": 0.5}]
    assert M.aggregate(rows, ["a", "b", "c"]) == {"a": {"value": 0.5, "n": 3}, "b": {"value": 0.5, "n": 1},
                                                   "c": {"value": None, "n": 0}}


def test_improvement_needs_more_than_min_delta():
    from lorafit.training.best_step import improved

    assert improved(0.94, 1.0, "min", 0.05)  # 0.94 < 1.0 - 0.05
    assert not improved(0.96, 1.0, "min", 0.05)
    assert not improved(1.0, 1.0, "min", 0.0)  # equal is not better
    assert improved(0.81, 0.8, "max", 0.0) and not improved(0.84, 0.8, "max", 0.05)
    assert improved(123.0, None, "min", 10.0)  # the first value is always the best so far


def test_every_metric_name_the_config_knows_is_scored():
    """config.GENERATION_METRICS (what eval.best.metric may name) and the scorer stay in step: each name is a
    function here and gets a value, or None where it does not apply, for one answer."""
    from lorafit.config import GENERATION_METRICS
    from lorafit.evaluate.examples import EvalExample
    from lorafit.evaluate.scoring import GenerationSettings, score

    example = EvalExample(prompt=({"role": "user", "content": "q [1]"},), reference='{"a": 1}', source="s", where="f:1",
                          should_refuse=False, provided=("1",))
    scored = score(example, '{"a": 1} [1]', GenerationSettings(json_schema={"type": "object"}))
    assert set(scored) == set(GENERATION_METRICS)
    assert all(callable(getattr(M, name)) for name in GENERATION_METRICS)
    assert scored["field_accuracy"] == 1.0 and scored["json_schema"] == 0.0  # "... [1]" is not JSON
