"""The final artifact: `<output_dir>/<name>-v<version>/final_artifact/`, complete or absent.

It holds the PEFT adapter (loadable with `PeftModel.from_pretrained`), the tokenizer, the resolved config, final
metrics, provenance (`metadata.json`), a model card, and `checksums.json` with the sha256 of every other file.
It is assembled in a hidden staging folder beside its final place, fsynced, and renamed in one step, so a crash
never leaves a folder that looks complete. docs/artifacts.md documents every file and field.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from lorafit.config import ArtifactConfig, Config
from lorafit.errors import LorafitError
from lorafit.hashing import sha256_file
from lorafit.model.lora_init import convert_to_original_base, initial_adapter, mutates_base
from lorafit.run_folder import RunFolder, public_tree, publish_folder, write_json

FINAL = RunFolder.ARTIFACT
CHECKSUMS = "checksums.json"
# adapter_config.json fields peft keeps as sets and writes in hash order; sorted, the file is reproducible.
_SET_FIELDS = ("target_modules", "modules_to_save", "exclude_modules")


def artifact_dir(run_dir: Path, artifact: ArtifactConfig) -> Path:
    return inside(run_dir, RunFolder(run_dir).artifact_dir(artifact.name, artifact.version))


def inside(root: Path, path: Path) -> Path:
    """``path`` resolved, or an error if it (or a link on the way) leads outside ``root``."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise LorafitError(
            f"{path}: resolves to {resolved}, outside the output folder {root}",
            why="lorafit only writes inside train.output_dir",
            fix="remove the symbolic link or choose other names",
        )
    return resolved


def refuse_existing_version(run_dir: Path, artifact: ArtifactConfig, *, overwrite: bool) -> None:
    target = artifact_dir(run_dir, artifact)
    if target.exists() and not overwrite:
        raise LorafitError(
            f"{target}: version {artifact.version} of {artifact.name} exists already",
            why="a published version must never change under the same number",
            fix="bump artifact.version (e.g. --set artifact.version=0.1.1), or pass --overwrite",
        )


def checksums_for(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` except checksums.json itself, by relative POSIX path."""
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != CHECKSUMS
    }


def write_checksums(folder: Path) -> dict[str, str]:
    """Write ``checksums.json`` (sha256 of every other file) into ``folder``; used for artifacts and merged models."""
    sums = checksums_for(folder)
    write_json(folder / CHECKSUMS, {"algorithm": "sha256", "files": sums})
    return sums


def _normalise_adapter_config(folder: Path) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in _SET_FIELDS:
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _fit_to_original_base(folder: Path, model, config: Config) -> dict:
    """After PiSSA/OLoRA the saved adapter fits the residual base the init left in memory: convert it to fit the
    base files (model/lora_init.py). Returns metadata.json's ``adapter_init``."""
    if not mutates_base(config.lora.init):
        return {"init": config.lora.init, "base_mutated_by_init": False}
    initial = initial_adapter(model)
    if initial is None:
        raise LorafitError(
            f"lora.init: {config.lora.init}: the adapter's step-0 values were not kept, so it cannot be converted to "
            "fit the original base",
            why="PiSSA/OLoRA train against a rewritten base; published as trained, the adapter would be claimed to fit "
            "base files it does not fit",
            fix="attach the adapter with lorafit.model.loading.attach_lora (it keeps them); no artifact was written",
        )
    return convert_to_original_base(folder, initial)


def model_card(config: Config, metadata: dict, metrics: dict, folder_name: str) -> str:
    """README.md with Hugging Face front matter and a usage snippet that loads the adapter with peft."""
    base = metadata["base_model"]["name_or_path"]
    lora = config.lora
    tags = ["lorafit", "peft", "lora"] + (["dora"] if lora.use_dora else []) + (["rslora"] if lora.use_rslora else [])
    tags += ["qlora"] if config.quant.bits else []
    tags += [lora.init.split("_niter_")[0]] if lora.init in ("pissa", "olora") or "_niter_" in lora.init else []
    datasets = sorted({Path(s["path"]).name for split in metadata["data"].values() for s in split["sources"]})
    front = {"base_model": base, "library_name": "peft", "pipeline_tag": "text-generation", "tags": tags,
             "datasets": datasets}
    if config.artifact.license:
        front["license"] = config.artifact.license
    import yaml

    results = []
    if metrics.get("eval_loss_first") is not None:
        results.append(f"| eval loss | {metrics['eval_loss_first']:.4f} | {metrics['eval_loss_final']:.4f} |")
    check = metadata["base_weight_check"]
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {config.artifact.name} v{config.artifact.version}", "",
        f"A LoRA adapter for `{base}`, trained with lorafit {metadata['software']['lorafit']}.", "",
        "## Training", "",
        "| setting | value |", "| --- | --- |",
        f"| rank / alpha / dropout | {lora.r} / {lora.alpha} / {lora.dropout} |",
        f"| target modules | {', '.join(lora.target_modules) if isinstance(lora.target_modules, list) else lora.target_modules} |",
        f"| steps / epochs | {metrics.get('steps')} / {metrics.get('epochs')} |",
        f"| learning rate / schedule | {config.train.learning_rate} / {config.train.scheduler} |",
        f"| batch size x accumulation | {config.train.batch_size} x {config.train.grad_accum} |",
        f"| seed | {config.train.seed} |",
        f"| trainable parameters | {metadata['parameters']['trainable']:,} of {metadata['parameters']['total']:,} |",
        "",
    ]
    if results:
        lines += ["## Results", "", "| metric | before | after |", "| --- | --- | --- |", *results, ""]
    lines += [
        "## Verification", "",
        f"- Base weights unchanged by training: **{check['unchanged']}** ({check['tensors']} frozen tensors hashed "
        f"before and after; fingerprint `{check['fingerprint'][:16]}…`).",
        *_init_card_lines(metadata.get("adapter_init") or {}),
        "- Every file's sha256 is in `checksums.json`; check them, the tensors and the base with:", "",
        "```bash", f"lorafit verify {folder_name} --base {base}", "```", "",
        "## Usage", "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{folder_name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{folder_name}")',
        "```", "",
    ]
    return "\n".join(lines)


def _init_card_lines(init: dict) -> list[str]:
    if not init.get("base_mutated_by_init"):
        return []
    return [f"- Initialised with {init['init']}: training ran on the residual base (W minus the initial adapter); "
            f"this adapter is converted to apply to the original base files, so its rank is {init['published_rank']} "
            f"(trained rank {init['trained_rank']}, same scale)."]


def write_final_artifact(run_dir: Path, model, tokenizer, config: Config, metadata: dict, metrics: dict,
                         *, overwrite: bool) -> Path:
    """Assemble the artifact in staging, fsync it, and rename it into place. Returns its folder."""
    target = artifact_dir(run_dir, config.artifact)
    refuse_existing_version(run_dir, config.artifact, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    inside(run_dir, target.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{FINAL}-staging-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        (staging / "README.md").unlink(missing_ok=True)  # peft's placeholder; ours follows
        metadata = {**metadata, "adapter_init": _fit_to_original_base(staging, model, config)}
        _normalise_adapter_config(staging)
        tokenizer.save_pretrained(staging)
        (staging / "training_config.yaml").write_text(config.to_yaml(), encoding="utf-8")
        write_json(staging / "training_metrics.json", metrics)
        write_json(staging / "metadata.json", metadata)
        (staging / "README.md").write_text(model_card(config, metadata, metrics, str(target)), encoding="utf-8")
        write_checksums(staging)
        public_tree(staging)  # mkdtemp (0700) and safetensors (0600) make them private; an artifact is shared
        # --overwrite (checked above): the old one is moved aside first, so there is never a mix of both
        publish_folder(staging, target, replace=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
