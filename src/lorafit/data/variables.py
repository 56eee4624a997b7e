"""Per-source template variables: ``vars: {name: Lora, author: ACME}`` fills ``{{name}}`` / ``{{ author }}`` in every
string of every row, at read time, before the format is applied (LLaMA-Factory's identity set is written this way
and filled when it is loaded). A placeholder still in a row afterwards is counted per source, and a warning names it:
the model would learn the braces literally.
"""

from __future__ import annotations

import re

from lorafit.data.readers import Row

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def fill(value: object, variables: dict[str, str]) -> object:
    """``value`` (a parsed row) with each ``{{name}}`` of ``variables`` replaced in its strings, keys untouched.

    >>> fill({"output": "I am {{name}}, made by {{ author }}.", "n": 3}, {"name": "Lora", "author": "ACME"})
    {'output': 'I am Lora, made by ACME.', 'n': 3}
    """
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda m: variables.get(m.group(1), m.group(0)), value) if "{{" in value else value
    if isinstance(value, dict):
        return {key: fill(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [fill(item, variables) for item in value]
    return value


def placeholders(value: object) -> set[str]:
    """The names of the ``{{name}}`` placeholders left in the strings of ``value``."""
    if isinstance(value, str):
        return set(PLACEHOLDER.findall(value)) if "{{" in value else set()
    if isinstance(value, dict):
        return set().union(*(placeholders(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(placeholders(item) for item in value))
    return set()


def fill_rows(rows: list[Row], variables: dict[str, str], stats) -> list[Row]:
    """The rows with ``variables`` filled in; rows still holding a placeholder are counted into ``stats``
    (``unfilled_rows``, ``unfilled_names``, ``unfilled_first``: where the first one is)."""
    filled, names = [], set()
    for row in rows:
        value = fill(row.value, variables) if variables and row.problem is None else row.value
        left = placeholders(value) if row.problem is None else set()
        if left:
            stats.unfilled_rows += 1
            stats.unfilled_first = stats.unfilled_first or row.where
            names |= left
        filled.append(Row(row.where, value, row.problem) if value is not row.value else row)
    stats.unfilled_names = sorted(names | set(stats.unfilled_names))
    return filled


def placeholder_warnings(stats: list) -> list[str]:
    """One warning per source whose rows still hold ``{{name}}`` placeholders after its ``vars`` were filled in."""
    warnings = []
    for s in stats:
        if s.unfilled_rows:
            listed = ", ".join("{{" + name + "}}" for name in s.unfilled_names)
            example = ", ".join(f"{name}: ..." for name in s.unfilled_names)
            warnings.append(f"{s.path}: {s.unfilled_rows} row(s) still hold the placeholder(s) {listed} (first at "
                            f"{s.unfilled_first}): the model would learn them literally (fix: set vars: {{{example}}} "
                            "on this source to fill them, as LLaMA-Factory does for its identity set)")
    return warnings
