"""`lorafit export gguf`: the adapter as a llama.cpp LoRA adapter file (optional extra ``lorafit[gguf]``).

The file is what llama.cpp's ``convert_lora_to_gguf.py`` writes, built with the ``gguf`` package's writer:
- metadata ``general.type = "adapter"``, ``general.architecture`` (the base's llama.cpp architecture),
  ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32);
- per adapted weight, two float32 tensors named from gguf-py's tensor name map, ``blk.{i}.attn_q.weight.lora_a``
  of numpy shape [r, in] (peft's lora_A as is) and ``...lora_b`` of shape [out, r] (peft's lora_B);
- for the ``llama`` architecture (Llama, Mistral) the rows of q_proj's and k_proj's lora_B are permuted the way
  the converter permutes the base's q/k weights (``LlamaModel.permute``): llama.cpp's rotary embedding pairs
  dimensions (i, i+1) where Hugging Face pairs (i, i + d/2). Only B carries output rows, so A is unchanged.

llama.cpp scales each pair by ``alpha / rank`` with the rank read from the tensor (``get_scale`` in
llama-adapter.h; alpha 0 means scale 1). One alpha per file must therefore reproduce peft's scale for every
module: plain LoRA always does (alpha / r_i); rsLoRA (alpha / sqrt(r)) does with one rank (written alpha is
alpha * sqrt(r)); per-module alphas (``alpha_pattern``) or rsLoRA with several ranks cannot, and are refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.artifact.verify import _ADAPTER_KEY, verify_artifact
from lorafit.errors import LorafitError
from lorafit.evaluate.progress import stage
from lorafit.model.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, resolve_adapter
from lorafit.run_folder import atomic_path

INSTALL_HINT = "pip install 'lorafit[gguf]'  (installs the gguf package)"

# config.json "architectures"[0] -> (llama.cpp architecture, whether q/k rows are permuted), as the classes of
# llama.cpp's convert_hf_to_gguf.py register them: LlamaModel (LLAMA, permutes) takes Llama and Mistral,
# Qwen2Model (QWEN2, NEOX-style rotary: no permutation) takes Qwen2.
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}


@dataclass(frozen=True)
class GgufPair:
    """One adapted weight as written: its GGUF name (without .lora_a/.lora_b) and its two float32 tensors."""

    module: str  # peft module path, e.g. model.layers.0.self_attn.q_proj
    name: str  # e.g. blk.0.attn_q.weight
    lora_a: torch.Tensor  # (r, in)
    lora_b: torch.Tensor  # (out, r), q/k rows permuted for the llama architecture
    permuted: bool


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise LorafitError("exporting to GGUF needs the gguf package, which is not installed",
                           fix=INSTALL_HINT) from None
    return gguf


def _refuse(adapter_dir: Path, what: str, why: str, fix: str = "export a plain LoRA adapter (lorafit merge makes a "
            "standalone model from any adapter)") -> LorafitError:
    return LorafitError(f"{adapter_dir / ADAPTER_CONFIG}: {what}", why=why, fix=fix)


def _check_config(adapter_dir: Path, config: dict) -> None:
    """Refuse what a llama.cpp LoRA file cannot hold, naming the field."""
    if config.get("peft_type", "LORA") != "LORA":
        raise _refuse(adapter_dir, f"peft_type is {config.get('peft_type')!r}", "llama.cpp adapters are LoRA pairs")
    if config.get("use_dora"):
        raise _refuse(adapter_dir, "use_dora is true", "DoRA's magnitude vector has no place in a llama.cpp adapter "
                      "(it only applies scale * B @ A)")
    if config.get("modules_to_save"):
        raise _refuse(adapter_dir, f"modules_to_save is {config['modules_to_save']}",
                      "those modules are full trained copies; a llama.cpp adapter holds only lora_a/lora_b pairs")
    if config.get("alpha_pattern"):
        raise _refuse(adapter_dir, "alpha_pattern is set (a different alpha per module)",
                      "llama.cpp reads one adapter.lora.alpha per file")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise _refuse(adapter_dir, f"bias is {config.get('bias')!r}" + (", lora_bias true" if config.get("lora_bias") else ""),
                      "trained biases have no place in a llama.cpp adapter")
    for key in ("target_parameters", "layer_replication"):
        if config.get(key):
            raise _refuse(adapter_dir, f"{key} is set", "convert_lora_to_gguf.py has no mapping for it")


def _architecture(base_path: str) -> tuple[str, bool, dict]:
    config_file = Path(base_path) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LorafitError(f"{config_file}: cannot read the base model's config ({exc})",
                           fix="pass the base model folder with --base MODEL_DIR") from None
    name = (config.get("architectures") or [None])[0]
    if name not in ARCHITECTURES:
        raise LorafitError(
            f"{config_file}: architecture {name} is not supported by the GGUF adapter export",
            why="tensor names and the q/k row order depend on the architecture; lorafit writes the ones it has "
            f"checked against llama.cpp's converter: {', '.join(ARCHITECTURES)}",
            fix="merge the adapter (lorafit merge) and convert the merged model with llama.cpp's convert_hf_to_gguf.py",
        )
    arch, permute = ARCHITECTURES[name]
    return arch, permute, config


def permute_rows(b: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's order of q/k output rows (convert_hf_to_gguf's ``LlamaModel.permute``) applied to lora_B."""
    out = b.shape[0]
    return b.reshape(n_head, 2, out // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def _written_alpha(adapter_dir: Path, config: dict, ranks: set[int]) -> float:
    """The one adapter.lora.alpha with which llama.cpp's alpha / rank equals peft's scale for every module."""
    alpha = float(config.get("lora_alpha", 8))
    if not config.get("use_rslora"):
        return alpha
    if len(ranks) != 1:
        raise _refuse(adapter_dir, f"use_rslora with ranks {sorted(ranks)}",
                      "rsLoRA scales by alpha / sqrt(r); llama.cpp by alpha / r with one alpha per file, which "
                      "matches alpha / sqrt(r) for one rank only")
    return alpha * math.sqrt(next(iter(ranks)))


def gguf_pairs(adapter_dir: Path, arch: str, permute: bool, base_config: dict) -> list[GgufPair]:
    """Every lora_A/lora_B pair of the adapter, named and laid out as llama.cpp reads them."""
    from safetensors.torch import load_file

    gguf = require_gguf()
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, int(base_config["num_hidden_layers"]))
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(adapter_dir / ADAPTER_WEIGHTS).items():
        match = _ADAPTER_KEY.match(key)
        if match is None or match["kind"] not in ("lora_A", "lora_B"):
            raise LorafitError(f"{adapter_dir / ADAPTER_WEIGHTS}: tensor {key} is not a lora_A/lora_B weight",
                               why="a llama.cpp adapter holds only lora_a/lora_b pairs of linear layers "
                               "(embedding LoRA, DoRA magnitudes and full weights are not exported)",
                               fix="train the adapter on linear layers only (lora.target_modules)")
        halves.setdefault(match["module"], {})[match["kind"]] = tensor.to(torch.float32)
    heads = {"q_proj": int(base_config["num_attention_heads"]),
             "k_proj": int(base_config.get("num_key_value_heads") or base_config["num_attention_heads"])}
    pairs = []
    for module, pair in sorted(halves.items()):
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None or not name.startswith("blk."):
            raise LorafitError(f"{adapter_dir / ADAPTER_WEIGHTS}: module {module} has no llama.cpp adapter tensor",
                               why="llama.cpp applies adapters to the transformer blocks' linear layers; embeddings "
                               "and lm_head need special handling its converter does not do for trained adapters",
                               fix="leave embed_tokens and lm_head out of lora.target_modules")
        if set(pair) != {"lora_A", "lora_B"}:
            raise LorafitError(f"{adapter_dir / ADAPTER_WEIGHTS}: module {module} has only {', '.join(pair)}")
        leaf = module.rsplit(".", 1)[-1]
        lora_b = permute_rows(pair["lora_B"], heads[leaf]) if permute and leaf in heads else pair["lora_B"]
        pairs.append(GgufPair(module, name, pair["lora_A"].contiguous(), lora_b.contiguous(),
                              permute and leaf in heads))
    return pairs


def export_gguf(adapter: str | Path, out: str | Path, *, base: str | Path | None = None) -> dict:
    """Write ``adapter`` (run, artifact or PEFT adapter folder) as a llama.cpp LoRA GGUF file at ``out``; returns
    what was written. The file appears whole or not at all (written beside it, then renamed)."""
    gguf = require_gguf()
    out = Path(out).expanduser().resolve()
    if out.exists():
        raise LorafitError(f"{out}: already exists", why="an export never replaces a file in place",
                           fix="remove it or pass another --out")
    resolved = resolve_adapter(adapter, base)
    stage(f"verifying {resolved.adapter_dir}")
    report = verify_artifact(resolved.adapter_dir)
    if report.status == "failed":
        raise LorafitError(f"{resolved.adapter_dir}: the adapter fails verification: {'; '.join(report.problems)}",
                           fix=f"run lorafit verify {resolved.adapter_dir} and export an intact adapter")
    _check_config(resolved.adapter_dir, resolved.config)
    arch, permute, base_config = _architecture(resolved.base_path)
    stage(f"converting the LoRA tensors for llama.cpp ({arch})")
    pairs = gguf_pairs(resolved.adapter_dir, arch, permute, base_config)
    alpha = _written_alpha(resolved.adapter_dir, resolved.config, {p.lora_a.shape[0] for p in pairs})
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as staging:  # run_folder.py: fsynced file and folder; no partial .gguf after a crash
        writer = gguf.GGUFWriter(str(staging), arch=arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        stage(f"writing {len(pairs)} tensor pairs to {out}")
        for pair in pairs:
            writer.add_tensor(pair.name + ".lora_a", pair.lora_a.numpy())
            writer.add_tensor(pair.name + ".lora_b", pair.lora_b.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"out": str(out), "adapter": str(resolved.adapter_dir), "architecture": arch, "alpha": alpha,
            "pairs": len(pairs), "permuted": sum(p.permuted for p in pairs),
            "ranks": sorted({p.lora_a.shape[0] for p in pairs})}
