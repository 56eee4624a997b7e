"""Retrieval groundedness: the share of an answer's statements that the retrieved context supports.

A lexical, deterministic definition (docs/eval.md), so the number is the same on every machine and needs no judge
model: it rewards answers that stay inside the passages and penalises statements whose content words the passages
do not contain. It does not check meaning (a negated passage still "supports" a statement); it is the cheap, exact
signal the reference pipelines log, not an entailment model.

    statements  the answer split after . ! ? (followed by a space or the end) and at line breaks, with citation
                markers removed; a piece with no content word is not a statement
    content     words() (lower-cased \\w+) minus STOPWORDS; numbers count
    supported   at least SUPPORT_THRESHOLD of the statement's distinct content words occur in the context
    score       supported / statements; an answer with no statement scores 0 (saying nothing is not grounded)
"""

from __future__ import annotations

import re
from typing import Iterable

SUPPORT_THRESHOLD = 0.5

# Function words that carry no claim; a closed, fixed list so the score never depends on an installed package.
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between both
but by can could did do does doing down during each either else ever few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just may me might more most must my myself no
nor not now of off on once only or other our ours ourselves out over own per same shall she should so some such than
that the their theirs them themselves then there these they this those through to too under until up upon us very
was we were what when where which while who whom whose why will with within without would yes yet you your yours
yourself yourselves s t d ll m re ve don doesn didn isn aren wasn weren won wouldn shouldn couldn can cannot
""".split())

_STATEMENT_END = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"\w+", re.UNICODE)


def content_words(text: str) -> set[str]:
    """Distinct lower-cased words that are not stopwords.

    >>> sorted(content_words("The capital of France is Paris, since 987."))
    ['987', 'capital', 'france', 'paris', 'since']
    """
    return {w for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


def statements(answer: str, citation_pattern: str | None = None) -> list[set[str]]:
    """The content words of each statement of ``answer`` (pieces without any are left out).

    >>> [sorted(s) for s in statements("Paris is the capital [1]. It is big!\\nOk", r"\\[(\\w+)\\]")]
    [['capital', 'paris'], ['big'], ['ok']]
    """
    if citation_pattern:
        answer = re.sub(citation_pattern, " ", answer)
    pieces = (content_words(piece) for piece in _STATEMENT_END.split(answer))
    return [piece for piece in pieces if piece]


def supported(statement: set[str], context: set[str], threshold: float = SUPPORT_THRESHOLD) -> bool:
    return len(statement & context) >= threshold * len(statement)


def groundedness(prediction: str, context: str | None, citation_pattern: str | None = None,
                 threshold: float = SUPPORT_THRESHOLD) -> float | None:
    """Share of the answer's statements supported by ``context``; None when the example has no context."""
    if context is None or not context.strip():
        return None
    found = statements(prediction, citation_pattern)
    if not found:
        return 0.0
    words = content_words(context)
    return sum(supported(s, words, threshold) for s in found) / len(found)


def marked_passages(prompt_texts: Iterable[str], citation_pattern: str) -> list[str]:
    """Passages a prompt marks with a citation id at the start of a line (``[1] Paris is ...``): each runs from its
    marker to the next marked line or blank line.

    >>> marked_passages(["Answer from:\\n[1] Paris is\\nin France.\\n[2] Rome.\\n\\nQuestion: where?"], r"\\[(\\w+)\\]")
    ['[1] Paris is\\nin France.', '[2] Rome.']
    """
    starts = re.compile(rf"^\s*(?:{citation_pattern})")
    passages: list[str] = []
    for text in prompt_texts:
        current: list[str] | None = None
        for line in text.splitlines():
            if starts.match(line):
                current = [line]
                passages.append("")
            elif current is not None and line.strip():
                current.append(line)
            else:
                current = None
                continue
            passages[-1] = "\n".join(current)
    return passages
