"""The run config: a strict, typed, nested schema, and the loader that turns a file into it.

Strict about what users write: an unknown key is an error with the closest valid key suggested, a duplicate
YAML key is an error, every problem in a file is reported at once, and the validated config is frozen.
Input paths (model and data) are resolved against the config file's folder, so a config runs the same from
any working directory; ``train.output_dir`` is resolved against the working directory, where runs belong.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from lorafit.errors import LorafitError

BUILTIN_TINY_MODEL = "lorafit:tiny"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _resolve_input_path(value: str, info: ValidationInfo) -> str:
    """Relative input paths are taken from the config file's folder (passed as validation context)."""
    if value == BUILTIN_TINY_MODEL:
        return value
    base = (info.context or {}).get("base_dir")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return str(path.resolve()) if base is not None else value


class ModelConfig(Section):
    path: str = Field(
        BUILTIN_TINY_MODEL,
        description=f"Local folder with an HF model and tokenizer, or '{BUILTIN_TINY_MODEL}' for the embedded tiny "
        "model (built on first use into the cache). Never downloaded from a hub.",
    )
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Precision the base weights load in.")
    trust_remote_code: bool = Field(False, description="Run Python code shipped in the model folder. Off: it is code execution.")

    @field_validator("path")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        # 'org/name' with no such local folder is a hub-style name, looked up in the local HF cache only.
        base = (info.context or {}).get("base_dir")
        looks_like_hub_id = re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", value) is not None
        if looks_like_hub_id and not (Path(base or ".") / value).exists():
            return value
        return _resolve_input_path(value, info)


class LoraConfig(Section):
    r: int = Field(16, gt=0, description="Adapter rank; higher = more capacity and memory.")
    alpha: float = Field(32, gt=0, description="Scale of the adapter update (alpha / r, or alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' for every linear layer but the output head."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): slower, sometimes better.")
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained in full and saved with the adapter.")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("empty list: name at least one module, or use 'all-linear'")
        return value


class QuantConfig(Section):
    bits: Literal[4, 8] | None = Field(None, description="Load the base in 4 or 8 bits (QLoRA); null = full precision.")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 (QLoRA's, better for normal weights) or fp4.")
    double_quant: bool = Field(True, description="4-bit: also quantize the quantization scales (saves ~0.4 bit per weight).")
    compute_dtype: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="Precision of the matmuls in quantized layers and of training autocast; bf16 on a recent GPU."
    )


class DataSource(Section):
    path: str = Field(..., description="A JSONL file of {'messages': [...]} conversations.")

    _resolve = field_validator("path")(_resolve_input_path)


class DataConfig(Section):
    train: list[DataSource] = Field(..., min_length=1, description="Training sources.")
    eval: list[DataSource] = Field(default_factory=list, description="Held-out sources for eval loss.")
    max_seq_length: int = Field(512, gt=0, description="Longest tokenised example, in tokens.")
    truncation: Literal["drop", "truncate"] = Field(
        "drop", description="Examples over max_seq_length: drop them, or cut them (keeps the start)."
    )


class TrainConfig(Section):
    output_dir: str = Field("runs/lorafit", description="Run folder (relative to the working directory).")
    epochs: float | None = Field(None, gt=0, description="Passes over the data; default 1 when max_steps is unset.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; replaces epochs.")
    batch_size: int = Field(8, gt=0, description="Examples per micro-batch (per device).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    scheduler: Literal["linear", "cosine", "constant"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Warmup as a fraction of all steps.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup in steps (instead of warmup_ratio).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null = off.")
    optimizer: Literal["adamw", "sgd", "paged_adamw_8bit"] = Field(
        "adamw", description="Optimizer; paged_adamw_8bit (bitsandbytes) keeps 8-bit states and pages them out of GPU memory."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward (non-reentrant): much less memory, ~30% slower on GPU, ~2x on CPU."
    )
    seed: int = Field(42, description="Seed for data order, dropout and adapter init.")
    log_every: int = Field(10, gt=0, description="Log metrics every N optimizer steps.")
    train_on_inputs: bool = Field(False, description="Supervise every token, not only assistant turns.")
    group_by_length: bool = Field(True, description="Batch examples of similar length: less padding, faster.")

    @model_validator(mode="after")
    def _one_of_each(self):
        for problem in train_clashes(self.model_dump()):
            raise ValueError(problem)
        return self


def train_clashes(train: dict) -> list[str]:
    """Options that exclude each other. Also run on the raw mapping, so a clash is reported with field errors."""
    given = {key for key, value in train.items() if value is not None}
    problems = []
    if {"epochs", "max_steps"} <= given:
        problems.append("train.epochs and train.max_steps are both set: a run stops by one of them, set only one")
    if {"warmup_ratio", "warmup_steps"} <= given:
        problems.append("train.warmup_ratio and train.warmup_steps are both set: warmup is given twice, set only one")
    return problems


class EvalConfig(Section):
    every: int | None = Field(50, gt=0, description="Evaluate every N optimizer steps; null = only at the end.")
    at_start: bool = Field(True, description="Evaluate once before training, for a before/after comparison.")
    batch_size: int | None = Field(None, gt=0, description="Eval batch size; default train.batch_size.")


class ArtifactConfig(Section):
    name: str = Field("adapter", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Adapter name (letters, digits, . _ -).")
    version: str = Field("0.1.0", pattern=r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?$", description="Semantic version.")
    license: str | None = Field(None, description="License written in the model card.")
    merge: bool = Field(
        False, description="After training, also write a standalone merged model (model.dtype) into <run folder>/merged/."
    )


class TrackingConfig(Section):
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers; all run offline/local."
    )


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    artifact: ArtifactConfig = Field(default_factory=ArtifactConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


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
        raw_train = data.get("train") if isinstance(data.get("train"), dict) else {}
        lines += [f"train: {p}" for p in train_clashes(raw_train) if f"train: {p}" not in lines]
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
        data = apply_overrides(data, overrides)
    return validate_config(data, base_dir=base_dir, source=name)


def default_config_path() -> Path:
    """The quickstart config shipped inside the package (its data ships beside it)."""
    return Path(__file__).parent / "resources" / "quickstart.yaml"


def warmup_steps_for(train: TrainConfig, total_steps: int) -> int:
    if train.warmup_steps is not None:
        return train.warmup_steps
    if train.warmup_ratio is not None:
        return math.ceil(train.warmup_ratio * total_steps)
    return 0


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
            type_name = re.sub(r"typing\.|<class '(\w+)'>", r"\1", str(annotation)).replace("NoneType", "null")
            lines.append(f"| `{prefix}{name}` | `{type_name}` | `{default}` | {field.description or ''} |")

    walk(Config, "")
    return "\n".join(lines)
