"""Quantized bases (bitsandbytes 4/8-bit), k-bit training preparation, and which mixed precision a run can use.

bitsandbytes is an optional extra: nothing here imports it until a config asks for it, and a missing install is
a LorafitError that says how to get it.

The 4-bit CPU guard (see docs/design.md, "QLoRA on CPU"): bitsandbytes 0.50's ``Linear4bit.forward`` converts a
layer's weights to a packed AVX512-BF16 inference layout the first time it runs in eval mode on a no-grad input
(any evaluation). The packed path then computes with ``gemv_4bit``, an op with no autograd kernel, so once the
layer is back in train mode the gradient through the frozen base is silently dropped and every LoRA gradient
below it is wrong. ``keep_4bit_training_layout`` turns that conversion off per layer; ``check_training_layout``
fails the run if any layer is found packed anyway (a bitsandbytes version that converts by another route).
"""

from __future__ import annotations

import importlib.metadata

import torch

from lorafit.config import Config, QuantConfig
from lorafit.errors import LorafitError, install_hint
from lorafit.model.resolved import DTYPES

INSTALL_HINT = install_hint("qlora", "bitsandbytes")
# The versions whose eval-mode 4-bit conversion was read and tested (nn/modules.py Linear4bit.forward); the
# qlora extra pins the same range (bitsandbytes>=0.50,<0.51).
TESTED_BITSANDBYTES = "0.50.x"


def require_bitsandbytes(what: str) -> None:
    try:
        import bitsandbytes  # noqa: F401  (an import, not find_spec: a broken install fails here too)
    except ImportError as exc:
        raise LorafitError(f"{what} needs bitsandbytes, which is not installed", why=str(exc), fix=INSTALL_HINT) from None


def bnb_config(quant: QuantConfig, *, sharded: bool = False):
    """The transformers BitsAndBytesConfig for ``quant`` (bits 4 or 8). ``sharded`` (FSDP): the packed 4-bit
    weights are stored in the compute dtype, the dtype of every other parameter, so FSDP can shard them with the
    rest (QLoRA under FSDP, docs/scaling.md); the bits and the arithmetic are the same."""
    from transformers import BitsAndBytesConfig

    require_bitsandbytes(f"quant.bits: {quant.bits}")
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
        bnb_4bit_quant_storage=DTYPES[quant.compute_dtype] if sharded else torch.uint8,
    )


def prepare_for_kbit_training(model):
    """peft's k-bit preparation (base frozen, norms/embeddings/head in fp32), input grads, 4-bit layout guard.

    Gradient checkpointing is left to Trainer (``train.gradient_checkpointing``, non-reentrant), so it is
    enabled once, the same way for quantized and full-precision bases.
    """
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # Input grads let reentrant checkpointing (a user's own callback, older transformers) still reach the adapters.
    model.enable_input_require_grads()
    keep_4bit_training_layout(model)
    return model


def _linear4bit_layers(model) -> list:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def keep_4bit_training_layout(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns how many layers it set.

    ``support_avx512bf16_for_cpu`` is the instance flag ``Linear4bit.forward`` checks before converting (set in
    its ``__init__`` from the CPU's features); False makes eval use the same kernel as training. Cost: CPU
    inference of 4-bit layers does not get the AVX512-BF16 kernel (irrelevant on GPU, where it never applies).
    """
    layers = _linear4bit_layers(model)
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def packed_4bit_layers(model) -> list[str]:
    """Names of 4-bit layers whose weights are in the packed CPU inference layout (must be none in training)."""
    names = []
    try:
        import bitsandbytes as bnb
    except ImportError:
        return names

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = getattr(module.weight, "quant_state", None)
            if getattr(state, "packing_format_for_cpu", False):
                names.append(name)
    return names


def bitsandbytes_version() -> tuple[int, int] | None:
    try:
        major, minor = importlib.metadata.version("bitsandbytes").split(".")[:2]
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def check_training_layout(model, when: str) -> None:
    """Fail the run the moment a 4-bit layer is found in the packed inference layout during training.

    The loop calls it before every step and after every evaluation: cheap (a flag per layer), and it turns the
    silent wrong-gradient failure into an error if a bitsandbytes version bypasses ``keep_4bit_training_layout``.
    """
    packed = packed_4bit_layers(model) if model is not None else []
    if packed:
        raise RuntimeError(
            f"{when}: {len(packed)} 4-bit layers switched to bitsandbytes' packed CPU inference layout "
            f"({', '.join(packed[:3])}, ...); LoRA gradients would be wrong from here on. bitsandbytes "
            f"{bitsandbytes_version()} is outside the version lorafit guards and pins ({TESTED_BITSANDBYTES}): "
            "please report it."
        )


# ---------------------------------------------------------------------------------------------- mixed precision


def mixed_precision(config: Config, dtype: str | None = None) -> str | None:
    """The autocast precision of a run: the quantized layers' compute dtype, or the base's own dtype (``dtype``:
    ``model.dtype`` resolved, for a config that still says auto)."""
    wanted = config.quant.compute_dtype if config.quant.bits else dtype or config.model.dtype
    return None if wanted == "fp32" else wanted


def check_precision_supported(config: Config) -> None:
    """bf16 needs a GPU with bf16 (Ampere or newer) or a CPU; fp16 autocast needs a CUDA GPU."""
    precision = mixed_precision(config)
    key = "quant.compute_dtype" if config.quant.bits else "model.dtype"
    if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise LorafitError(
            f"{key}: bf16 is not supported by this GPU ({torch.cuda.get_device_name()})",
            why="bf16 needs an NVIDIA GPU of compute capability 8.0 or newer (A100, RTX 30xx, H100, ...)",
            fix=f"set {key}: fp16 on this GPU",
        )
    if precision == "fp16" and not torch.cuda.is_available():
        raise LorafitError(
            f"{key}: fp16 mixed precision needs a CUDA GPU, and none is available",
            why="fp16 training relies on CUDA kernels and loss scaling; on a CPU it is unsupported or much slower",
            fix=f"set {key}: fp32 (fastest on most CPUs) or bf16",
        )


def check_optimizer_available(config: Config) -> None:
    if config.train.optimizer == "paged_adamw_8bit":
        require_bitsandbytes("train.optimizer: paged_adamw_8bit")


def optimizer_note(config: Config) -> str | None:
    """A line for the user when an option does less than its name says on this machine."""
    if config.train.optimizer == "paged_adamw_8bit" and not torch.cuda.is_available():
        return "train.optimizer paged_adamw_8bit: no GPU, so states stay 8-bit but are not paged (bitsandbytes falls back)"
    return None
