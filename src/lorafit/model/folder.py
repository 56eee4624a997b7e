"""What a local model folder holds, read from its file names alone: config, weights, tokenizer, chat template.

One reading for every place that needs it: `lorafit doctor` shows it as checks, `lorafit config validate` and the
first second of `lorafit train` (model/preflight.py) refuse an incomplete folder, and the loaders (model/loading.py)
refuse it too before transformers would fail deep inside with advice that does not fit (a folder without tokenizer
files ends in "install sentencepiece or tiktoken"). No torch, no transformers: file names and two small JSON files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.model import PICKLE_SUFFIXES

# Any one of these is a tokenizer transformers can build: the fast tokenizer's tokenizer.json, a SentencePiece
# model (Llama, Mistral, Gemma, T5), GPT-2 style vocab.json (+ merges.txt), a WordPiece vocab.txt.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt")
TOKENIZER_SUFFIXES = (".tiktoken",)  # tiktoken-based tokenizers (they ship their own code: trust_remote_code)
WEIGHTS_FIX = "copy the model's .safetensors files into the folder (save_pretrained writes them)"
TOKENIZER_FIX = "save the tokenizer into the model folder (tokenizer.save_pretrained(folder))"


@dataclass
class ModelFolder:
    """A model folder's contents, by file name."""

    path: Path
    has_config: bool = False
    safetensors: list[str] = field(default_factory=list)
    pickles: list[str] = field(default_factory=list)
    tokenizer: list[str] = field(default_factory=list)
    chat_template: bool = False
    pad_token: str | None = None
    model_type: str = ""  # config.json's model_type (what liger's kernels are chosen by); "" when unreadable

    @classmethod
    def read(cls, path: str | Path) -> "ModelFolder":
        path = Path(path)
        names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        settings = _json(path / "tokenizer_config.json") if "tokenizer_config.json" in names else {}
        pad = settings.get("pad_token")
        return cls(
            path=path,
            has_config="config.json" in names,
            safetensors=[n for n in names if n.endswith(".safetensors")],
            pickles=[n for n in names if Path(n).suffix in PICKLE_SUFFIXES],
            tokenizer=[n for n in names if n in TOKENIZER_FILES or n.endswith(TOKENIZER_SUFFIXES)],
            chat_template="chat_template.jinja" in names or "chat_template.json" in names
            or bool(settings.get("chat_template")),
            pad_token=pad.get("content") if isinstance(pad, dict) else pad,
            model_type=str(_json(path / "config.json").get("model_type", "")) if "config.json" in names else "",
        )

    def problems(self, *, config: bool = True, weights: bool = True, tokenizer: bool = True,
                 allow_pickle: bool = False) -> list[str]:
        """What stops a run from loading this folder, one line each (empty when nothing does)."""
        found = []
        if config and not self.has_config:
            found.append("no config.json (the architecture and sizes)")
        if weights and not self.safetensors:
            if not self.pickles:
                found.append("no weights (*.safetensors)")
            elif not allow_pickle:
                found.append(f"weights as pickle files only ({', '.join(self.pickles)}): loading one can run code")
        if tokenizer and not self.tokenizer:
            found.append(f"no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
        return found

    def require(self, *, config: bool = True, weights: bool = True, tokenizer: bool = True,
                allow_pickle: bool = False) -> None:
        """Raise one LorafitError naming everything missing from the folder (what ``lorafit doctor`` shows)."""
        found = self.problems(config=config, weights=weights, tokenizer=tokenizer, allow_pickle=allow_pickle)
        if not found:
            return
        fixes = []
        if any(p.startswith("no config.json") for p in found):
            fixes.append("point model.path at the folder save_pretrained() wrote")
        if any(p.startswith("no weights") for p in found):
            fixes.append(WEIGHTS_FIX)
        if any(p.startswith("weights as pickle") for p in found):
            fixes.append("convert the weights to safetensors (save_pretrained does), or pass --allow-pickle if you "
                         "trust the source")
        if any(p.startswith("no tokenizer") for p in found):
            fixes.append(TOKENIZER_FIX)
        raise LorafitError(
            f"{self.path}: the model folder is incomplete",
            details=found,
            why="a model folder holds config.json, the weights (*.safetensors) and the tokenizer files; "
            "`lorafit doctor CONFIG` lists what is there",
            fix="; ".join(fixes),
        )


def locate_model(name: str) -> str:
    """The folder ``model.path`` names (config.json checked), or a hub-style name returned as is (only the local
    Hugging Face cache is consulted for it, never a hub). Raises for a missing folder or a file."""
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LorafitError(
                f"{path}: no config.json in the model folder",
                why="a model folder holds config.json, the weights (*.safetensors) and the tokenizer files",
                fix="point model.path at the folder save_pretrained() wrote",
            )
        return str(path)
    if path.is_file():
        raise _not_a_model_folder(path)
    if path.is_absolute() or name.startswith("."):
        raise LorafitError(f"{name}: model folder not found",
                           fix="check model.path (relative paths start at the config file's folder)")
    return name  # a hub-style name: only the local Hugging Face cache is consulted (local_files_only)


def cached_hub_folder(name: str) -> Path:
    """The local Hugging Face cache's snapshot of a hub-style model name, found without any network access;
    LorafitError when it is not cached (lorafit never downloads)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise LorafitError(
            f"{name}: not a local model folder and not in the local Hugging Face cache",
            why=f"lorafit never downloads at run time ({type(exc).__name__})",
            fix="download it once (e.g. `hf download NAME --local-dir models/NAME`) and set model.path to that "
            "folder; a relative model.path starts at the config file's folder",
        ) from None


def _not_a_model_folder(path: Path) -> LorafitError:
    """model.path names a file: a GGUF (llama.cpp) file gets its own answer, it is the common case."""
    if path.suffix.lower() == ".gguf":
        return LorafitError(
            f"{path}: a GGUF file; GGUF bases are not supported for training",
            why="lorafit trains on a Hugging Face model folder (config.json + *.safetensors); GGUF holds llama.cpp's "
            "quantized inference weights, which LoRA training cannot update through",
            fix="set model.path to the Hugging Face folder the GGUF was made from (or convert it back to one), "
            "and use quant.bits for a quantized base",
        )
    return LorafitError(
        f"{path}: a file, not a model folder",
        why="model.path names the folder save_pretrained() wrote (config.json, *.safetensors, tokenizer files)",
        fix="point model.path at that folder",
    )


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
