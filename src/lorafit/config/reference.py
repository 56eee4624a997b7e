"""docs/config.md: every key with its type, default and description, generated from the schema."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel

from lorafit.config.schema import Config


def _type_name(annotation) -> str:
    """Readable type for the docs: `fp32 | bf16`, `list[str]`, `int | null` instead of typing reprs."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join("null" if a is None else str(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def schema_reference() -> str:
    """Markdown reference of every section and key, generated from the field descriptions (docs/config.md)."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            sub = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
            if sub is not None:
                walk(sub, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else (
                "[]" if field.default_factory is list else json.dumps(field.default)
            )
            type_name = _type_name(annotation).replace("|", "\\|")  # a bare | would split the table cell
            lines.append(f"| `{prefix}{name}` | `{type_name}` | `{default}` | {field.description or ''} |")

    walk(Config, "")
    return "\n".join(lines)
