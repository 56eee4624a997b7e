"""`lorafit verify --serving vllm`: what would stop vLLM's LoRA loader from serving this adapter, as warnings.

Each rule names the vLLM code that enforces it (read in vLLM's source, late 2025), so a rule can be re-checked
when vLLM changes:
- ``max_lora_rank`` takes only the values in ``MaxLoRARanks`` (vllm/config/lora.py), default 16; an adapter of a
  higher rank fails at load ("LoRA rank 32 is greater than max_lora_rank 16");
- ``PEFTHelper._validate_features`` (vllm/lora/peft_helper.py) refuses ``modules_to_save`` and DoRA;
- ``PEFTHelper`` reads one ``r`` and one ``lora_alpha``: its scale is ``lora_alpha / r`` (``/ sqrt(r)`` with
  rsLoRA) for every module, so ``rank_pattern`` / ``alpha_pattern`` modules would be scaled wrongly;
- ``LoRAModel.from_local_checkpoint`` accepts tensors of the model's linear layers only (``expected_lora_modules``);
  LoRA on ``embed_tokens`` / ``lm_head`` needed the added-vocabulary support that vLLM deprecated (v0.11) and
  removed; adapter biases (``bias`` "all"/"lora_only", ``lora_bias``) are not loaded by current vLLM (its loader
  has no bias tensors; versions from mid-2024 loaded them behind ``--enable-lora-bias``).
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafit.artifact.verify import _ADAPTER_KEY, read_safetensors_header
from lorafit.errors import LorafitError
from lorafit.model.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

SERVERS = ("vllm",)

# vllm/config/lora.py: MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]; max_lora_rank defaults to 16.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16

# Module names of token embeddings and output heads across the families lorafit trains (Llama-style, GPT-2,
# GPT-NeoX): vLLM's LoRA layers for them went with its added-vocabulary support.
EMBEDDING_MODULES = ("embed_tokens", "wte", "wpe", "lm_head", "embed_out", "embed_in")


def vllm_flag_for_rank(rank: int) -> int | None:
    """The smallest ``--max-lora-rank`` value vLLM accepts that holds ``rank``; None above the largest."""
    return next((value for value in VLLM_MAX_LORA_RANKS if value >= rank), None)


def _ranks(names_and_shapes: dict[str, list[int]]) -> set[int]:
    return {shape[0] for name, shape in names_and_shapes.items()
            if (m := _ADAPTER_KEY.match(name)) and m["kind"] == "lora_A" and shape}


def _config_warnings(config: dict) -> list[str]:
    warnings = []
    if config.get("peft_type", "LORA") != "LORA":
        warnings.append(f"peft_type {config.get('peft_type')!r}: vLLM serves LoRA adapters only")
    if config.get("use_dora"):
        warnings.append("use_dora: vLLM does not serve DoRA adapters (PEFTHelper refuses use_dora); train without "
                        "lora.use_dora, or merge the adapter (lorafit merge) and serve the merged model")
    if config.get("modules_to_save"):
        warnings.append(f"modules_to_save {config['modules_to_save']}: vLLM refuses adapters with modules_to_save "
                        "(full trained copies of those modules); merge the adapter and serve the merged model")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        what = f"bias {config.get('bias')!r}" if config.get("bias", "none") != "none" else "lora_bias"
        warnings.append(f"{what}: vLLM does not load adapter biases (current versions have no LoRA bias support; "
                        "older ones only with --enable-lora-bias); train with lora.bias: none")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            warnings.append(f"{key} {config[key]}: vLLM reads one r and one lora_alpha for the whole adapter and "
                            "would scale these modules differently from training")
    return warnings


def _module_warnings(names_and_shapes: dict[str, list[int]]) -> list[str]:
    unsupported = set()
    for name in names_and_shapes:
        match = _ADAPTER_KEY.match(name)  # full copies (modules_to_save) are warned about from the config
        if match and (match["module"].split(".")[-1] in EMBEDDING_MODULES or match["kind"].startswith("lora_embedding")):
            unsupported.add(match["module"])
    if not unsupported:
        return []
    return [f"target modules {', '.join(sorted(unsupported))}: vLLM serves LoRA on the decoder's linear layers "
            "(attention and MLP projections); token embeddings and lm_head need the added-vocabulary support it "
            "removed; leave them out of lora.target_modules"]


def _rank_warnings(ranks: set[int]) -> list[str]:
    if not ranks:
        return []
    highest = max(ranks)
    flag = vllm_flag_for_rank(highest)
    if flag is None:
        return [f"rank {highest}: above the largest max_lora_rank vLLM accepts ({VLLM_MAX_LORA_RANKS[-1]}); "
                f"train with lora.r <= {VLLM_MAX_LORA_RANKS[-1]}"]
    if highest > VLLM_DEFAULT_MAX_LORA_RANK:
        return [f"rank {highest}: above vLLM's default max_lora_rank {VLLM_DEFAULT_MAX_LORA_RANK}; start vLLM with "
                f"--max-lora-rank {flag} (accepted values: {', '.join(map(str, VLLM_MAX_LORA_RANKS))})"]
    return []


def serving_warnings(adapter_dir: str | Path, server: str = "vllm") -> list[str]:
    """What would stop ``server`` (one of SERVERS) from loading the adapter in ``adapter_dir``, one line each;
    empty when nothing would. Reads adapter_config.json and the safetensors header, not the tensors."""
    if server not in SERVERS:
        raise LorafitError(f"--serving {server}: unknown", fix=f"use one of {', '.join(SERVERS)}")
    adapter_dir = Path(adapter_dir)
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []  # verify reports the unreadable config as a problem; nothing to judge serving on
    header, problems = read_safetensors_header(adapter_dir / ADAPTER_WEIGHTS) if (adapter_dir / ADAPTER_WEIGHTS).is_file() else ({}, [])
    shapes = {} if problems else {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    return _config_warnings(config) + _module_warnings(shapes) + _rank_warnings(_ranks(shapes))
