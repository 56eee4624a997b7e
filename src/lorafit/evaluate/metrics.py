"""Generation metrics: pure functions of (prediction, reference, example fields), defined in docs/eval.md.

Each per-example function returns a number in [0, 1], or None when the metric does not apply to the example
(no JSON object to compare, no source offered to cite, no ``should_refuse`` mark). ``aggregate`` averages over
the examples where a metric applies and reports how many that was, so "n/a" never reads as 0.
"""

from __future__ import annotations

import json
import math
import re
from typing import Iterable

from lorafit.config import GENERATION_METRICS, LOSS_METRICS  # noqa: F401  (the names; the functions are below)
from lorafit.evaluate.groundedness import groundedness, marked_passages  # noqa: F401  (statements, stopwords)

DEFAULT_CITATION_PATTERN = r"\[([^\[\]\s]{1,64})\]"
DEFAULT_REFUSAL_PATTERNS = (
    r"\bI can(?:no|')t\b", r"\bI cannot\b", r"\bI(?: a|')m (?:not able|unable)\b", r"\bI won'?t\b",
    r"\bI(?: a|')m sorry\b", r"\bI must decline\b", r"\bcan(?:no|')t (?:help|assist) with\b",
)

_WORD = re.compile(r"\w+", re.UNICODE)
_FENCE = re.compile(r"^```[\w-]*\s*\n?(.*?)\n?```$", re.DOTALL)
# "key": value pairs with a scalar value, for answers that are almost JSON (a missing value, a cut-off end).
_PAIR = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null)')


def normalise(text: str) -> str:
    """Whitespace runs become one space; leading and trailing space goes.

    >>> normalise("  a \\n b ")
    'a b'
    """
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the answers are equal after ``normalise``, else 0.0 (case counts: JSON values are case-sensitive)."""
    return float(normalise(prediction) == normalise(reference))


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, underscore); punctuation is not a word.

    >>> words('{"Name": "Ana", "age": 41}')
    ['name', 'ana', 'age', '41']
    """
    return _WORD.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) * len(b)))."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over ``words``: P = LCS/len(pred), R = LCS/len(ref), F = 2PR/(P+R); 1.0 if both are empty."""
    pred, ref = words(prediction), words(reference)
    if not pred and not ref:
        return 1.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


_INVALID = object()


def parse_json(text: str, default=None):
    """The answer as JSON, or ``default``. The whole answer must be one JSON value; a ``` fence around it is allowed.

    >>> parse_json('```json\\n{"a": 1}\\n```')
    {'a': 1}
    >>> parse_json('Sure: {"a": 1}') is None
    True
    """
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1).strip()
    try:
        return json.loads(stripped)
    except (json.JSONDecodeError, RecursionError):
        return default


def json_valid(prediction: str) -> float:
    """1.0 if the answer parses as JSON (``parse_json``), else 0.0."""
    return float(parse_json(prediction, default=_INVALID) is not _INVALID)


def _validator(schema: dict):
    """A validator for the schema's own draft ($schema; 2020-12 when absent). ``$ref`` resolves inside the schema
    only: the referencing library retrieves nothing over the network unless given a retriever."""
    from jsonschema.validators import validator_for

    return validator_for(schema)(schema)


def schema_problem(schema: dict) -> str | None:
    """Why ``schema`` is not a valid JSON Schema for its draft, or None."""
    from jsonschema.exceptions import SchemaError

    try:
        type(_validator(schema)).check_schema(schema)
    except SchemaError as error:
        return f"{error.json_path}: {error.message}"
    return None


def _describe(error) -> str:
    """One line per failure, the answer's place first (``$.age``, ``$[1]``)."""
    keyword, value = error.validator, error.instance
    if keyword == "type":
        names = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return f"{error.json_path}: expected {' or '.join(names)}, got {type(value).__name__}"
    if keyword == "enum":
        return f"{error.json_path}: {value!r} not in {error.validator_value}"
    if keyword in ("minItems", "maxItems"):
        return f"{error.json_path}: {len(value)} items"
    return f"{error.json_path}: {error.message}"


def schema_errors(value, schema: dict) -> list[str]:
    """Where ``value`` breaks ``schema``, by the jsonschema library: every keyword of the schema's draft
    (anyOf, oneOf, allOf, not, $ref, if/then/else, ...), in the order the library reports them."""
    return [_describe(error) for error in _validator(schema).iter_errors(value)]


def json_schema(prediction: str, schema: dict | None) -> float | None:
    """1.0 if the answer is JSON and satisfies ``schema`` (``schema_errors`` is empty); None without a schema."""
    if schema is None:
        return None
    value = parse_json(prediction, default=_INVALID)
    if value is _INVALID:
        return 0.0
    return float(not schema_errors(value, schema))


def extract_fields(text: str) -> dict:
    """The answer's fields: the parsed object if the answer is a JSON object, else every ``"key": scalar`` pair
    found in the text (first occurrence wins), so a nearly-right answer is scored field by field.

    >>> extract_fields('{"name": "Ana", "age": "city": "city": "Rome"}')
    {'name': 'Ana', 'age': 'city', 'city': 'Rome'}
    """
    parsed = parse_json(text)
    if isinstance(parsed, dict):
        return parsed
    fields: dict = {}
    for match in _PAIR.finditer(text):
        try:
            key, value = json.loads(f'"{match.group(1)}"'), json.loads(match.group(2))
        except json.JSONDecodeError:
            continue
        fields.setdefault(key, value)
    return fields


def _reference_object(reference: str) -> dict | None:
    expected = parse_json(reference)
    return expected if isinstance(expected, dict) and expected else None


def field_presence(prediction: str, reference: str) -> float | None:
    """Share of the reference JSON object's keys that the answer has (``extract_fields``), whatever their values.

    None when the reference is not a JSON object. Measures the answer's structure ("the right fields"),
    independently of whether it parses (json_valid) or has the right values (field_accuracy).
    """
    expected = _reference_object(reference)
    if expected is None:
        return None
    got = extract_fields(prediction)
    return sum(key in got for key in expected) / len(expected)


def field_accuracy(prediction: str, reference: str) -> float | None:
    """Share of the reference JSON object's keys whose value the answer reproduces exactly (``extract_fields``;
    ``41`` and ``"41"`` differ). None when the reference is not a JSON object.
    """
    expected = _reference_object(reference)
    if expected is None:
        return None
    got = extract_fields(prediction)
    return sum(key in got and got[key] == value and type(got[key]) is type(value) for key, value in expected.items()) / len(expected)


def citations(text: str, pattern: str = DEFAULT_CITATION_PATTERN) -> list[str]:
    """Cited ids: group 1 of ``pattern`` if it has a group, else the whole match.

    >>> citations("Paris [1], founded early [doc-7].")
    ['1', 'doc-7']
    """
    compiled = re.compile(pattern)
    return [m.group(1) if compiled.groups else m.group(0) for m in compiled.finditer(text)]


def citation_coverage(prediction: str, provided: Iterable[str], pattern: str = DEFAULT_CITATION_PATTERN) -> float | None:
    """1.0 if the answer cites at least one provided source id, else 0.0; None when no source was provided."""
    allowed = set(provided)
    if not allowed:
        return None
    return float(any(cited in allowed for cited in citations(prediction, pattern)))


def is_refusal(text: str, patterns: Iterable[str] = DEFAULT_REFUSAL_PATTERNS) -> bool:
    """True if any pattern (regular expression, case-insensitive) occurs in the answer."""
    return any(re.search(p, text, re.IGNORECASE) for p in patterns)


def refusal_correct(prediction: str, should_refuse: bool | None, patterns: Iterable[str] = DEFAULT_REFUSAL_PATTERNS) -> float | None:
    """1.0 if the answer refuses exactly when the example is marked ``should_refuse``; None when unmarked."""
    if should_refuse is None:
        return None
    return float(is_refusal(prediction, patterns) == bool(should_refuse))


def perplexity(loss: float) -> float:
    """exp(mean token negative log-likelihood), capped at exp(50) so a diverged run stays printable."""
    return math.exp(min(loss, 50.0))


def aggregate(rows: list[dict], names: Iterable[str]) -> dict[str, dict]:
    """Mean of each metric over the rows where it applies: ``{name: {"value": mean or None, "n": count}}``."""
    out = {}
    for name in names:
        values = [r[name] for r in rows if r.get(name) is not None]
        out[name] = {"value": sum(values) / len(values) if values else None, "n": len(values)}
    return out
