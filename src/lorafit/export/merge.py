"""Merge an adapter into its base: a standalone model folder that loads with transformers alone.

    adapter folder -> base reloaded in fp32 from its original weights (never the quantized one) -> adapter on
    top -> reference logits on fixed probe prompts -> merge_and_unload -> cast to the chosen dtype -> save into
    a staging folder -> reload it with AutoModelForCausalLM -> compare logits (fail above the tolerance) ->
    [4-bit/8-bit adapters: logits of the quantized adapter model, the quantization gap] -> merge_report.json,
    checksums.json -> rename the staging folder to --out.

Merging in fp32 and rounding once at the end is the most exact merge; it needs about 4 bytes of RAM per
parameter (32 GB for an 8B model). Merging into the 4-bit model itself is off by ~0.25 in logits (FIELD_NOTES),
which is why a quantized base is never the merge target.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from lorafit.artifact.publish import write_checksums
from lorafit.config import ModelConfig, QuantConfig
from lorafit.errors import LorafitError
from lorafit.evaluate.progress import stage
from lorafit.model.adapters import load_adapter_model, resolve_adapter, training_quant
from lorafit.model.loading import load_base_model
from lorafit.model.resolved import DTYPES
from lorafit.model.lora_init import mutating_init_problem
from lorafit.run_folder import public_tree, publish_folder

# Max |logit difference| allowed between the merged model as saved (reloaded from disk) and adapter-on-base in
# fp32. fp32 is exact up to summation order (measured 3e-6 on the tiny model); bf16/fp16 round every weight to
# 8/11 significant bits (measured 0.036 / 0.0026), allowed here with a wide margin for deeper, wider models.
TOLERANCE = {"fp32": 1e-4, "fp16": 0.1, "bf16": 0.5}

# Fixed probe prompts: chat-templated, so the logits compared are those a user of the merged model gets.
PROBE_PROMPTS = [
    "What does a LoRA adapter change in a model?",
    "Extract the name and age as JSON: Ana Souza is 31 and works as a nurse in Lisbon.",
    "Write one sentence about the sea.",
    "2 + 2 =",
]


def claim_output(out_dir: Path) -> Path:
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LorafitError(
            f"{out_dir}: exists and is not an empty folder",
            why="a merge never mixes its files with others or replaces a model in place",
            fix="pass a new (or empty) folder with --out",
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return out_dir


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, *, dtype: str = "fp32", base: str | Path | None = None,
                  quant: QuantConfig | None = None, replace: bool = False, echo=None) -> dict:
    """Merge ``adapter_dir`` into its base and write a standalone model into ``out_dir``; returns the report.

    ``adapter_dir``: a run folder, an artifact folder or any PEFT causal-LM adapter folder. ``quant``: the
    quantization the adapter trained with (default: read from training_config.yaml), for the quantization-gap
    figures; none are computed when it trained without quantization. ``replace``: swap out an existing
    ``out_dir`` (the run folder's own merged/).
    """
    from transformers import AutoModelForCausalLM

    say = echo or stage  # the CLI's progress lines (evaluate/progress.py); silent for the Python API
    if dtype not in TOLERANCE:
        raise LorafitError(f"--dtype {dtype}: not a merge precision", fix=f"use one of {', '.join(TOLERANCE)}")
    adapter = resolve_adapter(adapter_dir, base)
    adapter_dir, base_path = adapter.adapter_dir, adapter.base_path
    refuse_mutating_init(adapter_dir)
    out_dir = Path(out_dir).expanduser().resolve()
    if not replace:
        claim_output(out_dir)
    quant = quant if quant is not None else training_quant(adapter_dir)
    tokenizer = adapter.load_tokenizer()
    probes = probe_batch(tokenizer)

    say(f"loading {base_path} in fp32 and applying {adapter_dir}")
    model = load_adapter_model(adapter, dtype="fp32")
    reference = probe_logits(model, probes)
    merged = model.merge_and_unload(safe_merge=True)
    del model
    merged = merged.to(DTYPES[dtype])
    merged.config.use_cache = True  # the merged model is for inference; training had switched the cache off

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        say(f"saving the merged model in {dtype}")
        merged.save_pretrained(staging)
        del merged
        tokenizer.save_pretrained(staging)
        check_dtype_on_disk(staging, dtype)

        say("reloading the saved model and comparing its logits with the adapter on its base")
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=DTYPES[dtype], local_files_only=True)
        diff = (probe_logits(reloaded, probes) - reference).abs()
        del reloaded
        report = {
            "adapter_dir": str(adapter_dir),
            "base_model": str(base_path),
            "dtype": dtype,
            "probe_prompts": PROBE_PROMPTS,
            "probe_tokens": int(probes["attention_mask"].sum()),
            "reference": "adapter on the base reloaded in fp32 from its original weights",
            "max_abs_logit_diff": float(diff.max()),
            "mean_abs_logit_diff": float(diff.mean()),
            "tolerance": TOLERANCE[dtype],
        }
        if quant is not None and quant.bits:  # without quantized training there is no gap, and no third load
            say(f"measuring the quantization gap (the adapter on the {quant.bits}-bit base)")
            report["quantization_gap"] = quantization_gap(base_path, adapter_dir, quant, probes, reference)
        if report["max_abs_logit_diff"] > TOLERANCE[dtype]:
            raise LorafitError(
                f"merged model differs from adapter-on-base by {report['max_abs_logit_diff']:.3g} in logits "
                f"(tolerance for {dtype}: {TOLERANCE[dtype]})",
                why="the merged model would not behave like the adapter you trained",
                fix="merge in fp32 (--dtype fp32) to check whether the precision is the cause, and report it",
            )
        (staging / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        say("writing checksums and moving the merged model into place")
        write_checksums(staging)
        public_tree(staging)  # mkdtemp (0700) and safetensors (0600) make them private; a model is shared
        publish_folder(staging, out_dir, replace=replace)  # without replace, out_dir is absent or empty (claim_output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def refuse_mutating_init(adapter_dir: Path) -> None:
    """A PiSSA/OLoRA/LoftQ adapter saved unconverted: peft would rewrite the base while loading it, and the logit check
    would compare the merge against that rewritten base, so a passing check would prove nothing about the base."""
    problem = mutating_init_problem(json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8")))
    if problem:
        raise LorafitError(f"{adapter_dir}: not merged", why=problem,
                           fix="merge the converted adapter (lorafit's artifacts are converted already)")


def probe_batch(tokenizer) -> dict:
    """The probe prompts, chat-templated and right-padded (pad positions are masked out of every comparison)."""
    if tokenizer.chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in PROBE_PROMPTS]
    else:
        texts = list(PROBE_PROMPTS)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def probe_logits(model, probes: dict) -> torch.Tensor:
    """fp32 logits at every non-padding position of the probes, flattened to (tokens, vocab)."""
    model.eval()
    device = next(model.parameters()).device
    logits = model(input_ids=probes["input_ids"].to(device), attention_mask=probes["attention_mask"].to(device)).logits
    keep = probes["attention_mask"].bool().to(device)
    return logits[keep].float().cpu()


def quantization_gap(base_path: str, adapter_dir: Path, quant: QuantConfig, probes: dict, reference: torch.Tensor) -> dict:
    """Logit difference between the adapter on the quantized base (as trained) and on the fp32 base."""
    from peft import PeftModel

    from lorafit.model.quantization import keep_4bit_training_layout

    try:
        model = load_base_model(ModelConfig(path=base_path, dtype="fp32"), base_path, quant)
    except LorafitError as error:  # bitsandbytes missing: the merge itself does not need it
        return {"skipped": error.what}
    keep_4bit_training_layout(model)  # the numerics the adapter trained with, not bitsandbytes' inference repack
    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    diff = (probe_logits(model, probes) - reference).abs()
    return {
        "quant": quant.model_dump(),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "meaning": "adapter on the quantized base (as trained) vs the merged full-precision model's reference; "
        "expected to be non-zero, shown so the change from dropping quantization is visible",
    }


def check_dtype_on_disk(folder: Path, dtype: str) -> None:
    """Every floating-point tensor in the saved safetensors must be in ``dtype``: never silently fp32."""
    from safetensors import safe_open

    expected = DTYPES[dtype]
    wrong = []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            for name in handle.keys():
                tensor_dtype = handle.get_slice(name).get_dtype()
                if tensor_dtype in ("F32", "F16", "BF16", "F64") and tensor_dtype != _SAFETENSORS_NAMES[expected]:
                    wrong.append(f"{name}: {tensor_dtype}")
    if wrong:
        raise LorafitError(f"merged weights are not all {dtype} on disk: {', '.join(wrong[:5])}",
                           why="a merged model must be saved in the precision asked for")


_SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def merge_at_end(config, adapter_dir: Path, run) -> dict:
    """With artifact.merge, the standalone merged model in <run>/merged (replacing an earlier one)."""
    if not config.artifact.merge:
        return {}
    report = merge_adapter(adapter_dir, run / run.MERGED, dtype=config.model.dtype, quant=config.quant, replace=True)
    return {"merged_dir": str(run / run.MERGED),
            "merge": {k: report[k] for k in ("dtype", "max_abs_logit_diff", "mean_abs_logit_diff")}}
