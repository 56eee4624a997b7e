"""Where a run came from: software versions, the lorafit commit, the hardware, input hashes."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

from lorafit.hashing import sha256_file, sha256_json, sha256_text

PACKAGES = ("lorafit", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "tokenizers",
            "bitsandbytes", "trl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "vocab.json", "merges.txt")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def lorafit_git_commit() -> str | None:
    """The commit of the lorafit checkout this code runs from, if it is one (editable installs)."""
    here = Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def hardware() -> dict:
    import torch

    info = {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def weight_files(model_dir: Path) -> dict[str, str]:
    """sha256 of each weights file in a model folder (streamed), by file name."""
    files = sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin"))
    return {path.name: sha256_file(path) for path in files}


def tokenizer_identity(tokenizer, model_dir: Path) -> dict:
    chat_template = getattr(tokenizer, "chat_template", None) or ""
    files = {name: sha256_file(Path(model_dir) / name) for name in TOKENIZER_FILES if (Path(model_dir) / name).is_file()}
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "files_sha256": files,
        "chat_template_sha256": sha256_text(chat_template) if chat_template else None,
    }


def collect_metadata(config, model_path: str, tokenizer, data: dict, parameters: dict, base_check, started: float,
                     *, health: dict | None = None) -> dict:
    """Everything needed to know what an adapter is and to train it again: written as metadata.json.
    ``health``: whether the run learned or diverged (training/health.py assess_health)."""
    import time

    from lorafit import __version__

    model_dir = Path(model_path)
    config_json = model_dir / "config.json"
    ended = time.time()
    sources = {}
    for split, stats in data.items():
        sources[split] = {
            **{k: v for k, v in stats.items() if k != "sources"},
            "sources": [{**source, "sha256": sha256_file(Path(source["path"]))} for source in stats["sources"]],
        }
    return {
        "lorafit_metadata_version": 1,
        "artifact": {"name": config.artifact.name, "version": config.artifact.version, "license": config.artifact.license},
        "software": {**package_versions(), "lorafit": __version__, "lorafit_git_commit": lorafit_git_commit()},
        "hardware": hardware(),
        "seed": config.train.seed,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "ended_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ended)),
        "duration_seconds": round(ended - started, 2),
        "config_sha256": sha256_json(config.to_dict()),
        "config": config.to_dict(),
        "base_model": {
            "name_or_path": model_path,
            "config_sha256": sha256_file(config_json) if config_json.is_file() else None,
            "weight_files_sha256": weight_files(model_dir) if model_dir.is_dir() else {},
            "dtype": config.model.dtype,
            "quantization": {"bits": config.quant.bits},
        },
        "tokenizer": tokenizer_identity(tokenizer, model_dir),
        "data": sources,
        "parameters": parameters,
        "base_weight_check": base_check.as_dict(),
        "training_health": health,
    }
