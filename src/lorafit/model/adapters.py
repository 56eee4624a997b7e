"""From a folder a user names to an adapter and its base: adapter folders, run folders, the base model path, and
the quantization the adapter was trained with."""

from __future__ import annotations

import json
from pathlib import Path

from lorafit.config import ModelConfig, QuantConfig
from lorafit.errors import LorafitError
from lorafit.model.loading import resolve_model_path


def read_adapter_config(adapter_dir: Path) -> dict:
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file() or not (adapter_dir / "adapter_model.safetensors").is_file():
        raise LorafitError(
            f"{adapter_dir}: not an adapter folder",
            why="an adapter folder holds adapter_config.json and adapter_model.safetensors",
            fix="pass the folder `lorafit train` reported as the adapter (training_summary.json: adapter_dir)",
        )
    return json.loads(config_file.read_text(encoding="utf-8"))


def resolve_base(adapter_dir: Path, base: str | Path | None) -> str:
    """The base model folder: ``base`` if given, else adapter_config.json's base_model_name_or_path."""
    if base is None:
        base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
        if not base:
            raise LorafitError(
                f"{adapter_dir / 'adapter_config.json'}: base_model_name_or_path is empty",
                fix="pass the base model folder with --base MODEL_DIR",
            )
        if not Path(base).exists() and (Path(base).is_absolute() or str(base).startswith(".")):
            raise LorafitError(
                f"{base}: the adapter's base model folder (adapter_config.json base_model_name_or_path) is not found",
                fix="pass the base model folder with --base MODEL_DIR",
            )
    return resolve_model_path(ModelConfig(path=str(base)))


def training_quant(adapter_dir: Path) -> QuantConfig | None:
    """The quant section the adapter was trained with, from training_config.yaml beside it (or a parent)."""
    import yaml

    for folder in (adapter_dir, *list(adapter_dir.parents)[:2]):
        config_file = folder / "training_config.yaml"
        if config_file.is_file():
            section = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("quant") or {}
            try:
                quant = QuantConfig.model_validate(section)
            except ValueError:
                return None  # written by another lorafit version: no gap report rather than a failed merge
            return quant if quant.bits else None
    return None


def resolve_adapter_dir(path: Path) -> Path:
    """An adapter folder, or a run folder (its training_summary.json names the adapter folder)."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return path
    summary = path / "training_summary.json"
    if summary.is_file():
        adapter_dir = Path(json.loads(summary.read_text(encoding="utf-8"))["adapter_dir"])
        if (adapter_dir / "adapter_config.json").is_file():
            return adapter_dir
    raise LorafitError(
        f"{path}: no adapter_config.json here",
        why="--adapter takes an adapter folder (adapter_config.json + adapter_model.safetensors) or a finished run folder",
        fix="point --adapter at the folder `lorafit train` reported as 'adapter'",
    )
