"""Rewrite the generated key table in docs/config.md from the schema's field descriptions (one source)."""

from pathlib import Path

from lorafit.config import schema_reference

START, END = "<!-- schema:start -->", "<!-- schema:end -->"
doc = Path(__file__).resolve().parent.parent / "docs" / "config.md"
text = doc.read_text(encoding="utf-8")
head, _, rest = text.partition(START)
_, _, tail = rest.partition(END)
doc.write_text(f"{head}{START}\n{schema_reference()}\n{END}{tail}", encoding="utf-8")
print(f"updated {doc}")
