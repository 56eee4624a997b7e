"""Reading a config file: strict YAML/JSON (duplicate keys refused), --set overrides, and errors rewritten as
`path: what (got value)` with the nearest valid key, every problem at once."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lorafit.config.schema import EXCLUSIVE_KEYS, Config, data_clashes, train_clashes
from lorafit.errors import LorafitError

# ---------------------------------------------------------------------------------------------- file loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise LorafitError(
                f"{loader.name}:{key_node.start_mark.line + 1}: duplicate key {key!r} "
                f"(first given on line {seen[key] + 1})",
                why="YAML would silently keep only the last value",
                fix="keep one of them",
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise LorafitError(f"{path}: config file not found", fix="check the path, or run `lorafit train` alone for the quickstart")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        def no_dups(pairs):
            keys = [k for k, _ in pairs]
            dup = next((k for k in keys if keys.count(k) > 1), None)
            if dup is not None:
                raise LorafitError(f"{path}: duplicate key {dup!r}", why="JSON would keep only the last value", fix="keep one of them")
            return dict(pairs)

        try:
            data = json.loads(text, object_pairs_hook=no_dups)
        except json.JSONDecodeError as exc:
            raise LorafitError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}", fix="fix the syntax at that line") from None
    else:
        loader = _StrictLoader(text)
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise LorafitError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}", fix="fix the syntax at that line") from None
        finally:
            loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LorafitError(f"{path}: the config must be a mapping of sections (model, lora, data, train, ...)")
    return data


# ---------------------------------------------------------------------------------------------- overrides


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with each ``a.b.c=value`` applied; values are parsed as YAML scalars.

    >>> apply_overrides({"train": {"seed": 1}}, ["train.seed=7", "lora.r=32"])
    {'train': {'seed': 7}, 'lora': {'r': 32}}
    """
    result = json.loads(json.dumps(data))  # deep copy: never mutate what the caller passed
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise LorafitError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.learning_rate=1e-4")
        value = yaml.safe_load(raw) if raw.strip() else None
        node: Any = result
        parts = key.strip().split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise LorafitError(f"--set {item!r}: {'.'.join(parts[:depth])} is a list of {len(node)}; {part!r} is not an index in it")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise LorafitError(f"--set {item!r}: {'.'.join(parts[:depth])} is a value, not a section")
    return result


def drop_replaced(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` without the file's half of each exclusive pair that an override sets.

    An override is the last word on a run, so `--set train.max_steps=100` replaces the file's `epochs: 2`
    instead of clashing with it. Setting a key to null replaces nothing.

    >>> drop_replaced({"train": {"epochs": 2, "seed": 1}}, ["train.max_steps=100"])
    {'train': {'seed': 1}}
    """
    result = json.loads(json.dumps(data))
    given = {key.strip(): raw for key, sep, raw in (o.partition("=") for o in overrides) if sep}
    for pair in EXCLUSIVE_KEYS:
        for key, other in (pair, pair[::-1]):
            if key in given and other not in given and yaml.safe_load(given[key] or "~") is not None:
                section, name = other.split(".")
                if isinstance(result.get(section), dict):
                    result[section].pop(name, None)
    return result


# ---------------------------------------------------------------------------------------------- validation errors

_FIELD_NAMES_CACHE: dict[tuple, list[str]] = {}


def _known_keys(loc: tuple) -> list[str]:
    """Field names valid at ``loc`` (the path of the unknown key's parent), for 'did you mean'."""
    model: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields) if model is not None else []


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    path = _format_loc(loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, key = loc[:-1], str(loc[-1])
        known = _known_keys(parent)
        match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f" — did you mean {_format_loc((*parent, match[0]))}?" if match else f" — valid keys here: {', '.join(known)}"
        return f"{path}: unknown key{hint}"
    if kind == "missing":
        return f"{path}: required key is missing"
    message = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None and kind != "none_required" else f" (got {value!r})"
    return f"{path}: {message}{shown}"


def _dedupe_union_errors(errors: list[dict]) -> list[dict]:
    """A value failing a union (e.g. 'all-linear' | list) reports once per branch; keep one line per place."""
    out, seen = [], set()
    for err in errors:
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        if err["type"] != "extra_forbidden" and loc in seen:
            continue
        seen.add(loc)
        out.append(err)
    return out


def validate_config(data: dict, *, base_dir: Path | None, source: str = "config") -> Config:
    """Validate a raw mapping into a frozen Config, or raise one LorafitError listing every problem."""
    try:
        return Config.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        lines = [_describe(e) for e in _dedupe_union_errors(exc.errors())]
        # Clashes are checked on the raw sections too: pydantic skips a section's validator when a field failed.
        for section, clashes in (("train", train_clashes), ("data", data_clashes)):
            raw = data.get(section) if isinstance(data.get(section), dict) else {}
            lines += [f"{section}: {p}" for p in clashes(raw) if f"{section}: {p}" not in lines]
        raw_train = data.get("train") if isinstance(data.get("train"), dict) else {}
        if "train_on_inputs" in raw_train:
            # Renamed with the data layer (issue 3): say where it went instead of only "unknown key".
            lines = [line.replace("train.train_on_inputs: unknown key", "train.train_on_inputs: moved to data.train_on "
                                  "(true -> data.train_on: all, false -> all_assistant); unknown key") for line in lines]
        raise LorafitError(
            f"{source}: {len(lines)} problem{'s' if len(lines) > 1 else ''} in the config",
            details=lines,
            fix="see `lorafit config show` for the full schema with defaults, and docs/config.md",
        ) from None


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> Config:
    """Load and validate a config from a YAML/JSON file (or a dict), with ``--set`` style overrides.

    Relative input paths in a file resolve against the file's folder; in a dict, against the working directory.
    """
    if isinstance(source, dict):
        data, base_dir, name = source, Path.cwd(), "config"
    else:
        path = Path(source).expanduser().resolve()
        data, base_dir, name = _read_config_file(path), path.parent, str(source)
    if overrides:
        data = apply_overrides(drop_replaced(data, overrides), overrides)
    return validate_config(data, base_dir=base_dir, source=name)


def default_config_path() -> Path:
    """The quickstart config shipped inside the package (its data ships beside it)."""
    return Path(__file__).parent.parent / "resources" / "quickstart.yaml"
