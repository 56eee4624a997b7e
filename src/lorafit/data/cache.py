"""On-disk cache of tokenised sources, never stale.

The key is a sha256 over everything the tokenised result depends on: the data file's bytes, the source's
config, the data options that shape tokenisation (max_seq_length, truncation, train_on, curriculum_field,
system_turn), the tokenizer (its full serialisation and special tokens), the chat template text and a cache
format version. Any
change gives a new key, so an entry is never reused for other inputs. Entries are written to a temporary folder and
renamed, so a killed run never leaves a half entry; token ids go in safetensors, the rest in JSON (no pickle).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lorafit.data.sources import Example, SourceData, SourceStats
from lorafit.hashing import sha256_file, sha256_json
from lorafit.run_folder import publish_folder

CACHE_VERSION = "3"  # bump when reading, normalising or labelling changes what a source tokenises to


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


def load(key: str) -> SourceData | None:
    folder = cache_dir() / key
    if not (folder / "meta.json").is_file():
        return None
    from safetensors.torch import load_file

    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    tensors = load_file(folder / "tokens.safetensors")
    ids, labels, offsets = tensors["input_ids"].tolist(), tensors["labels"].tolist(), tensors["offsets"].tolist()
    examples = [
        Example(ids[start:end], labels[start:end], **info)
        for (start, end), info in zip(zip(offsets[:-1], offsets[1:]), meta["examples"])
    ]
    return SourceData(examples, SourceStats(**meta["stats"]), meta["skipped_rows"])


def store(key: str, data: SourceData) -> None:
    from safetensors.torch import save_file

    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    offsets = [0]
    for example in data.examples:
        offsets.append(offsets[-1] + len(example.input_ids))
    tensors = {
        "input_ids": torch.tensor([t for e in data.examples for t in e.input_ids], dtype=torch.int64),
        "labels": torch.tensor([t for e in data.examples for t in e.labels], dtype=torch.int64),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
    }
    meta = {
        "stats": data.stats.as_dict(),
        "skipped_rows": data.skipped_rows,
        "examples": [{"where": e.where, "identity": e.identity, "rank": e.rank,
                      "unterminated_turns": e.unterminated_turns, "truncated": e.truncated} for e in data.examples],
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=root))
    try:
        save_file(tensors, staging / "tokens.safetensors")
        (staging / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        publish_folder(staging, root / key)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process stored the same key first: theirs is as good
