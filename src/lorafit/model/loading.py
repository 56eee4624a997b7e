"""Base model, tokenizer and LoRA adapters: loaded from local files only, adapted with peft."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from lorafit.config import BUILTIN_TINY_MODELS, LoraConfig, ModelConfig, QuantConfig
from lorafit.errors import LorafitError
from lorafit.model import PICKLE_SUFFIXES
from lorafit.model.attention import Machine, load_with_attention
from lorafit.model.folder import ModelFolder, locate_model
from lorafit.model.kernels import apply_kernels, check_head_not_adapted
from lorafit.model.lora_init import INIT_ATTRIBUTE, InitialAdapter, mutates_base, peft_init_value
from lorafit.model.resolved import DTYPES, resolve_auto, resolve_dtype

def with_resolved_dtype(config):
    """The run's config with ``model.dtype: auto`` made concrete, once, at the start of a run: loading, mixed
    precision, merge, provenance and the resume identity then all see the dtype the run used. (The config layer
    stays torch-free, so it cannot resolve it itself.)"""
    dtype = resolve_dtype(config.model.dtype, Machine.current())
    if dtype == config.model.dtype:
        return config
    return config.model_copy(update={"model": config.model.model_copy(update={"dtype": dtype})})


def resolve_model_path(model: ModelConfig) -> str:
    """A local folder for ``model.path``; builds the embedded tiny model on first use. Never downloads."""
    if model.path in BUILTIN_TINY_MODELS:
        from lorafit.model.tiny import ensure_tiny_model

        return str(ensure_tiny_model(constructed=BUILTIN_TINY_MODELS[model.path]))
    return locate_model(model.path)  # model/folder.py: a folder, or a hub-style name for the local cache


def _local_only(fn, name: str, **kwargs):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing below may reach a hub
    try:
        return fn(name, local_files_only=True, **kwargs)
    except OSError as exc:
        raise LorafitError(
            f"{name}: not a local model folder and not in the local Hugging Face cache",
            why=f"lorafit never downloads at run time ({type(exc).__name__}: {str(exc).splitlines()[0]})",
            fix="download it once (e.g. `hf download NAME --local-dir models/NAME`) and set model.path to that folder",
        ) from None


def load_tokenizer(model: ModelConfig, path: str):
    from transformers import AutoTokenizer

    if Path(path).is_dir() and not model.trust_remote_code:  # remote code may build its tokenizer its own way
        ModelFolder.read(path).require(config=False, weights=False)  # not transformers' "install sentencepiece"
    tokenizer = _local_only(AutoTokenizer.from_pretrained, path, trust_remote_code=model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding is masked by position, so reusing EOS as pad is safe (labels keep real EOS tokens).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def refuse_pickle_weights(folder: Path, *, allow_pickle: bool, what: str = "model") -> None:
    """A folder whose weights exist only as pickle files (.bin/.pt) is refused unless the user allows it."""
    folder = Path(folder)
    if not folder.is_dir() or list(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and allow_pickle:
        warnings.warn(f"{folder}: loading pickle weights ({', '.join(pickles)}) because --allow-pickle was given; "
                      "they can run code when loaded", stacklevel=2)
    elif pickles:
        raise LorafitError(
            f"{folder}: the {what} weights are pickle files only ({', '.join(pickles)})",
            why="loading a pickle can run arbitrary code; lorafit loads tensors through safetensors only",
            fix="convert the weights to safetensors (save_pretrained does), or pass --allow-pickle if you trust the source",
        )


def load_base_model(model: ModelConfig, path: str, quant: QuantConfig | None = None, *, allow_pickle: bool = False,
                    sharded: bool = False):
    """The base in ``model.dtype``; with ``quant.bits`` set, its linear layers quantized by bitsandbytes."""
    from transformers import AutoModelForCausalLM

    refuse_pickle_weights(Path(path), allow_pickle=allow_pickle)
    if Path(path).is_dir():
        ModelFolder.read(path).require(tokenizer=False, allow_pickle=allow_pickle)
    extra = {}
    if quant is not None and quant.bits is not None:
        from lorafit.model.quantization import bnb_config

        extra["quantization_config"] = bnb_config(quant, sharded=sharded)
    resolved = resolve_auto(model, ModelFolder.read(path).model_type, Machine.current())
    base = load_with_attention(lambda attn: _local_only(
        AutoModelForCausalLM.from_pretrained, path, dtype=DTYPES[resolved.dtype], trust_remote_code=model.trust_remote_code,
        use_safetensors=None if allow_pickle else True, attn_implementation=attn, **extra,
    ), model.attn_implementation, resolved.attention)
    base.config.use_cache = False  # training never needs the KV cache; it also keeps packed rows independent
    apply_kernels(base, resolved.kernels)
    return base


def linear_module_names(model) -> list[str]:
    """Leaf names of the model's linear layers (e.g. q_proj, down_proj), what target_modules accepts."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)})


def check_targets(model, lora: LoraConfig) -> None:
    """lora.target_modules and modules_to_save against the model's module names (a meta-device model will do)."""
    module_names = [name for name, _ in model.named_modules()]
    problems = []
    if isinstance(lora.target_modules, list):
        linear = set(linear_module_names(model))
        missing = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in module_names)]
        if missing:
            problems.append(f"lora.target_modules: {missing} not found; the model's linear modules are: {sorted(linear)}")
    missing_saved = [t for t in lora.modules_to_save if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing_saved:
        problems.append(f"lora.modules_to_save: {missing_saved} not found in the model")
    if problems:
        raise LorafitError("the adapter targets modules the model does not have", details=problems, fix="use names from the list above")


def attach_lora(model, lora: LoraConfig):
    """Wrap ``model`` with trainable LoRA adapters; every base weight stays frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    check_targets(model, lora)
    check_head_not_adapted(model, lora.target_modules, lora.modules_to_save)
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules),
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        modules_to_save=list(lora.modules_to_save) or None,
        init_lora_weights=peft_init_value(lora.init),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_config)
    if mutates_base(lora.init):
        # Kept for publishing (the conversion to the original base) and for base-vs-adapter comparisons.
        setattr(model, INIT_ATTRIBUTE, InitialAdapter.capture(model, lora.init))
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
