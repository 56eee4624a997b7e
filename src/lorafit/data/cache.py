"""On-disk cache of tokenised sources, never stale.

The key is a sha256 over everything the tokenised result depends on: the data file's bytes, the source's
config, the data options that shape tokenisation (max_seq_length, truncation, train_on, curriculum_field,
system_turn), the tokenizer (its full serialisation and special tokens), the chat template text and a cache
format version. Any
change gives a new key, so an entry is never reused for other inputs. Entries are written to a temporary folder and
renamed, so a killed run never leaves a half entry; token ids go in safetensors, the rest in JSON (no pickle).
Every kind of row is cached the same way (SFT examples, preference pairs, triplets, unpaired answers): each
example dataclass's ``list[int]`` fields are token columns, its other fields JSON, its normalised row (``record``)
JSON rebuilt into its record class. GRPO prompts are not cached: their rows carry arbitrary user fields for the
reward functions, and tokenising a prompt is a small share of a GRPO step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lorafit.data.sources import Example, SourceData, SourceStats
from lorafit.hashing import sha256_file, sha256_json
from lorafit.run_folder import publish_folder

CACHE_VERSION = "4"  # bump when reading, normalising or labelling changes what a source tokenises to


def tokenizer_digest(tokenizer) -> str:
    """A digest of the tokenizer's vocabulary, merges, normaliser and special tokens, and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        model = backend.to_str()
    else:  # a slow tokenizer: its vocabulary is what we can see
        model = sorted(tokenizer.get_vocab().items())
    specials = {"all": sorted(tokenizer.all_special_tokens), "added": sorted(tokenizer.get_added_vocab().items()),
                "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "class": type(tokenizer).__name__}
    return sha256_json({"model": model, "specials": specials, "template": getattr(tokenizer, "chat_template", None) or ""})


def source_key(source, options: dict, tokenizer_hash: str) -> str:
    payload = {"version": CACHE_VERSION, "file": sha256_file(Path(source.path)),
               # The path is part of the key because the entry records where each row came from (error and report lines).
               "source": source.model_dump(mode="json", exclude={"weight", "max_examples", "max_tokens", "eval_fraction"}),
               "options": options, "tokenizer": tokenizer_hash}
    return sha256_json(payload)


def cache_root() -> Path:
    """lorafit's cache folder (tokenised data, the built tiny model): $LORAFIT_CACHE or ~/.cache/lorafit."""
    return Path(os.environ.get("LORAFIT_CACHE") or Path.home() / ".cache" / "lorafit")


def cache_dir() -> Path:
    return cache_root() / "data"


def _token_fields(cls) -> list[str]:
    """The example class's token-id lists (input_ids, labels, rejected_ids, ...): stored in safetensors."""
    return [f.name for f in dataclasses.fields(cls) if f.type in ("list[int]", list[int])]


def _record_json(record) -> dict | None:
    return None if record is None else dataclasses.asdict(record)


def _record_from_json(cls, value: dict | None):
    """A normalised row back from JSON: its tuple fields (the conversation turns) were written as lists."""
    if value is None:
        return None
    hints = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if hints[k].startswith("tuple") and isinstance(v, list) else v for k, v in value.items()})


def load(key: str, cls=Example, record_cls=None) -> SourceData | None:
    """The entry for ``key`` as ``cls`` examples (any kind's example dataclass), or None when there is none."""
    folder = cache_dir() / key
    if not (folder / "meta.json").is_file():
        return None
    from safetensors.torch import load_file

    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    tensors = load_file(folder / "tokens.safetensors")
    columns = {}
    for name in _token_fields(cls):
        flat, offsets = tensors[name].tolist(), tensors[f"{name}.offsets"].tolist()
        columns[name] = [flat[start:end] for start, end in zip(offsets[:-1], offsets[1:])]
    examples = []
    for i, info in enumerate(meta["examples"]):
        if "record" in info:
            info = {**info, "record": _record_from_json(record_cls, info["record"])}
        examples.append(cls(**{name: column[i] for name, column in columns.items()}, **info))
    return SourceData(examples, SourceStats(**meta["stats"]), meta["skipped_rows"])


def store(key: str, data: SourceData) -> None:
    """Write one source's examples (any kind: SFT rows, preference pairs, triplets, unpaired answers) under ``key``."""
    from safetensors.torch import save_file

    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    cls = type(data.examples[0]) if data.examples else Example
    token_fields = _token_fields(cls)
    tensors = {}
    for name in token_fields:
        rows = [getattr(e, name) for e in data.examples]
        offsets = [0]
        for row in rows:
            offsets.append(offsets[-1] + len(row))
        tensors[name] = torch.tensor([t for row in rows for t in row], dtype=torch.int64)
        tensors[f"{name}.offsets"] = torch.tensor(offsets, dtype=torch.int64)
    others = [f.name for f in dataclasses.fields(cls) if f.name not in token_fields]
    meta = {
        "stats": data.stats.as_dict(),
        "skipped_rows": data.skipped_rows,
        "examples": [{name: _record_json(getattr(e, name)) if name == "record" else getattr(e, name) for name in others}
                     for e in data.examples],
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=root))
    try:
        save_file(tensors, staging / "tokens.safetensors")
        (staging / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        publish_folder(staging, root / key)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process stored the same key first: theirs is as good


def cached_source(source, tokenizer, options: dict, read, *, use_cache: bool, cls, record_cls=None):
    """``read()`` -> (examples, stats, skipped rows) for one source, through the cache when ``use_cache``: the
    same key rules for every kind of row (``options`` names the kind and every option that shapes its tokens)."""
    key = None
    if use_cache:
        if not Path(source.path).is_file():
            return read()  # raises the reader's usual "data file not found"
        key = source_key(source, options, tokenizer_digest(tokenizer))
        cached = load(key, cls, record_cls)
        if cached is not None:
            return cached.examples, cached.stats, cached.skipped_rows
    examples, stats, skipped = read()
    if key is not None:
        store(key, SourceData(examples, stats, skipped))
    return examples, stats, skipped
