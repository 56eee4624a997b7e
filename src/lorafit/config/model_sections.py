"""The model-side config sections: the base model, its LoRA adapter and its quantization (split from ``schema`` so
each file stays readable). Bottom layer: pydantic only."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

BUILTIN_TINY_MODEL = "lorafit:tiny"
# The built-in models and whether their weights are constructed (model/tiny_weights.py). "lorafit:tiny-random" is
# the same architecture all random (what "lorafit:tiny" was before version 2): the contrastive, preference and
# GRPO examples use it, because on the constructed base every pooled state shares one large constant direction
# and the contrastive metrics start saturated (stability 0.998, separation 0.001) and show nothing.
BUILTIN_TINY_MODELS = {BUILTIN_TINY_MODEL: True, "lorafit:tiny-random": False}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def resolve_input_path(value: str, info: ValidationInfo) -> str:
    """Relative input paths are taken from the config file's folder (passed as validation context)."""
    if value in BUILTIN_TINY_MODELS:
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
        "model (built on first use into the cache; 'lorafit:tiny-random': the same model with all-random weights). "
        "Never downloaded from a hub.",
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Precision the base weights load in. 'auto': bf16 on a GPU that supports it, else fp32 "
        "(resolved when the run starts, so checking a config needs no torch; the run records the resolved value).",
    )
    trust_remote_code: bool = Field(False, description="Run Python code shipped in the model folder. Off: it is code execution.")
    attn_implementation: Literal["auto", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "eager"] = Field(
        "auto",
        description="Attention kernel. 'auto': flash-attention 3 or 2 where installed and the GPU and dtype allow "
        "(bf16/fp16), else sdpa. Every choice keeps packed examples apart; flex_attention cannot train on a CPU.",
    )
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto",
        description="Fused Triton kernels (liger-kernel: RMSNorm, SwiGLU, fused linear cross-entropy). 'auto': "
        "on with CUDA and the package installed (the liger extra); 'liger' without them is an error.",
    )


    @field_validator("path")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        # 'org/name' with no such local folder is a hub-style name, looked up in the local HF cache only.
        base = (info.context or {}).get("base_dir")
        looks_like_hub_id = re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", value) is not None
        if looks_like_hub_id and not (Path(base or ".") / value).exists():
            return value
        return resolve_input_path(value, info)


INITS = ("default", "gaussian", "pissa", "olora")
LOFTQ_REFUSAL = (
    "loftq is not supported: peft's LoftQ init replaces each base weight by a quantized residual Q(W - B0@A0), so the "
    "adapter fits only that new base, not the base files lorafit proves unchanged (and converting it back is not exact: "
    "the quantization error stays); peft's other route, replace_lora_weights_loftq on a 4-bit base, runs on CUDA only "
    "(peft 0.21.2). Use quant.bits: 4 with init default (QLoRA), or pissa in full precision"
)


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
    init: str = Field(
        "default",
        description="How the adapter starts (peft's init_lora_weights): default (B = 0, A Kaiming-uniform), gaussian "
        "(B = 0, A Gaussian with std 1/r), pissa / pissa_niter_N (A, B from the top-r singular vectors; N = randomised-SVD "
        "iterations), olora (A, B from a QR decomposition). pissa and olora move part of each weight into the adapter; "
        "the artifact is converted to apply to the original base, at twice the rank (docs/adapters.md). loftq: refused "
        "(why in docs/adapters.md).",
    )
    loraplus_lr_ratio: float | None = Field(
        None, gt=0,
        description="LoRA+: learning rate of every lora_B = this x train.learning_rate (lora_A keeps it); the paper "
        "uses 16, with a base rate about half of plain LoRA's. null = one rate for A and B.",
    )

    @field_validator("init")
    @classmethod
    def _known_init(cls, value: str) -> str:
        if value == "loftq":
            raise ValueError(LOFTQ_REFUSAL)
        if value not in INITS and not re.fullmatch(r"pissa_niter_[1-9][0-9]*", value):
            raise ValueError(f"unknown initialisation {value!r}: use one of {', '.join(INITS)} or pissa_niter_N "
                             "(N iterations of randomised SVD, e.g. pissa_niter_4)")
        return value

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


def init_fits_quantization(config):
    """PiSSA and OLoRA on a quantized base: peft re-quantizes the residual, so Quant(W - B0@A0) + B0@A0 is not the
    base the files hold and the converted adapter would not reproduce the trained model (peft warns the same)."""
    if config.lora.init.startswith(("pissa", "olora")) and config.quant.bits is not None:
        raise ValueError(f"lora.init: {config.lora.init} with quant.bits: {config.quant.bits}: the initialisation would "
                         "re-quantize a residual base, which the published adapter cannot be proven to fit; use "
                         "quant.bits: null (full precision) with pissa/olora, or init default with quantization")
    return config
