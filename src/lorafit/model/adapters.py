"""From a folder a user names to an adapter, its base and its tokenizer: the one path merge, generate, chat,
eval and verify take.

A user may name a run folder (its newest final artifact), an artifact folder, or any PEFT adapter folder.
``resolve_adapter`` turns each into a ``ResolvedAdapter``; ``load_adapter_model`` puts it on its base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorafit.config import ModelConfig, QuantConfig
from lorafit.errors import LorafitError
from lorafit.model.loading import load_base_model, load_tokenizer, resolve_model_path
from lorafit.run_folder import RunFolder

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Any one of these makes a folder's tokenizer loadable; peft adapters saved without a tokenizer have none.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
# Run folder layout (run_folder.RunFolder names it): <run>/<name>-v<version>/final_artifact.
_FINAL_ARTIFACTS = f"*-v*/{RunFolder.ARTIFACT}"
_RUN_SUMMARY = RunFolder.SUMMARY


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter folder and everything needed to use it: its config, its base folder, where its tokenizer is."""

    adapter_dir: Path
    config: dict
    base_path: str
    tokenizer_dir: Path

    @property
    def task_type(self) -> str | None:
        return self.config.get("task_type")

    def training_config(self) -> dict | None:
        """training_config.yaml written beside a lorafit artifact (None for adapters from elsewhere)."""
        import yaml

        path = self.adapter_dir / "training_config.yaml"
        if not path.is_file():
            return None
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        return loaded if isinstance(loaded, dict) else None

    def load_tokenizer(self):
        return load_tokenizer(ModelConfig(path=self.base_path), str(self.tokenizer_dir))


def find_adapter_dir(path: str | Path) -> Path:
    """The adapter folder a user means by ``path``: the folder itself, or a run folder's newest final artifact."""
    path = Path(path).expanduser().resolve()
    if (path / ADAPTER_CONFIG).is_file():
        return path
    summary = path / _RUN_SUMMARY
    if summary.is_file():
        try:
            named = Path(json.loads(summary.read_text(encoding="utf-8")).get("adapter_dir") or "")
        except (json.JSONDecodeError, AttributeError):
            named = Path()
        if str(named) not in ("", "."):
            # A copied or moved run folder still names the old place: its own artifact of that name is meant.
            here = named if named.is_relative_to(path) else path / named.parent.name / named.name
            if (here / ADAPTER_CONFIG).is_file():
                return here
    artifacts = [p for p in path.glob(_FINAL_ARTIFACTS) if (p / ADAPTER_CONFIG).is_file()] if path.is_dir() else []
    if artifacts:
        # A run folder moved since training (its summary names the old place), or one whose run has not finished
        # writing the summary: the newest artifact is the one the last finished training published.
        return max(artifacts, key=lambda p: (p / ADAPTER_CONFIG).stat().st_mtime)
    raise LorafitError(
        f"{path}: not an adapter folder (no {ADAPTER_CONFIG}), and not a run folder with a final artifact",
        why=f"an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}; a run folder holds "
        "<name>-v<version>/final_artifact",
        fix="pass the run folder (train.output_dir), its <name>-v<version>/final_artifact folder, or a PEFT adapter folder",
    )


def read_adapter_config(adapter_dir: Path) -> dict:
    config_file = adapter_dir / ADAPTER_CONFIG
    if not config_file.is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise LorafitError(
            f"{adapter_dir}: not an adapter folder",
            why=f"an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}",
            fix="pass the run folder (train.output_dir), its final_artifact folder, or a PEFT adapter folder",
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LorafitError(f"{config_file}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict):
        raise LorafitError(f"{config_file}: must be a JSON object")
    return config


def check_causal_lm(adapter_dir: Path, config: dict) -> None:
    """Refuse adapters made for another task: on a causal LM their heads (e.g. SEQ_CLS's ``score``) would be dropped."""
    task_type = config.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise LorafitError(
            f"{adapter_dir / ADAPTER_CONFIG}: task_type is {task_type!r}, not CAUSAL_LM",
            why="lorafit loads adapters on a causal language model; a "
            f"{task_type} adapter's head (modules_to_save: {config.get('modules_to_save') or []}) has no place there "
            "and would be silently dropped",
            fix="use this adapter with the model class it was trained for (transformers/peft directly)",
        )


def resolve_base(adapter_dir: Path, base: str | Path | None, config: dict | None = None) -> str:
    """The base model folder: ``base`` if given, else adapter_config.json's base_model_name_or_path."""
    if base is None:
        base = (config if config is not None else read_adapter_config(adapter_dir)).get("base_model_name_or_path")
        if not base:
            raise LorafitError(
                f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path is empty",
                fix="pass the base model folder with --base MODEL_DIR",
            )
        if not Path(base).exists() and (Path(base).is_absolute() or str(base).startswith(".")):
            raise LorafitError(
                f"{base}: the adapter's base model folder (adapter_config.json base_model_name_or_path) is not found",
                fix="pass the base model folder with --base MODEL_DIR",
            )
    return resolve_model_path(ModelConfig(path=str(base)))


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def resolve_adapter(path: str | Path, base: str | Path | None = None) -> ResolvedAdapter:
    """Run folder, artifact folder or PEFT adapter folder -> the adapter, its base and its tokenizer's folder."""
    adapter_dir = find_adapter_dir(path)
    config = read_adapter_config(adapter_dir)
    check_causal_lm(adapter_dir, config)
    base_path = resolve_base(adapter_dir, base, config)
    tokenizer_dir = adapter_dir if has_tokenizer(adapter_dir) else Path(base_path)
    return ResolvedAdapter(adapter_dir, config, base_path, tokenizer_dir)


def refuse_irreproducible_init(adapter: ResolvedAdapter) -> None:
    """An adapter saved unconverted after a randomised base-rewriting init (pissa_niter_N, LoftQ): peft re-runs that
    init on the base while loading it, and a new random draw gives another residual base than the one the adapter
    was trained on, so every answer would silently come from a different model. (Exact PiSSA and OLoRA re-run
    deterministically; lorafit publishes all of them converted, for the unchanged base.)"""
    init = adapter.config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa_niter", "loftq")):
        raise LorafitError(
            f"{adapter.adapter_dir}: init_lora_weights {init!r}: this adapter cannot be loaded reproducibly",
            why="peft would redo the randomised initialisation on the base while loading it, giving another base "
            "than the one the adapter was trained on",
            fix="convert it to a plain LoRA adapter for the original base (peft: save_pretrained("
            "path_initial_model_for_weight_conversion=...); lorafit's own artifacts are converted already)",
        )


def load_adapter_model(adapter: ResolvedAdapter, *, dtype: str = "fp32", quant: QuantConfig | None = None):
    """The adapter on its base (``quant``: as trained, else full precision), for inference."""
    from peft import PeftModel

    refuse_irreproducible_init(adapter)
    model = load_base_model(ModelConfig(path=adapter.base_path, dtype=dtype), adapter.base_path, quant)
    return PeftModel.from_pretrained(model, adapter.adapter_dir, is_trainable=False)


def training_quant(adapter_dir: Path) -> QuantConfig | None:
    """The quant section the adapter was trained with, from training_config.yaml beside it (or a parent);
    None when it trained without quantization."""
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
