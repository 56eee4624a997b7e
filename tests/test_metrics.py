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
    from lorafit.training.guards import improved

    assert improved(0.94, 1.0, "min", 0.05)  # 0.94 < 1.0 - 0.05
    assert not improved(0.96, 1.0, "min", 0.05)
    assert not improved(1.0, 1.0, "min", 0.0)  # equal is not better
    assert improved(0.81, 0.8, "max", 0.0) and not improved(0.84, 0.8, "max", 0.05)
    assert improved(123.0, None, "min", 10.0)  # the first value is always the best so far
