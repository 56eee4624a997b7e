"""Hashes that prove what a file or a set of weights is: files streamed, tensors by their raw bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """sha256 of a file, streamed in 1 MiB chunks (base weights can be many GB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (dtype and shape folded in, so a reinterpretation is never 'equal')."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    digest = hashlib.sha256(f"{tensor.dtype}:{tuple(tensor.shape)}:".encode())
    if tensor.numel():
        digest.update(tensor.view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _quant_state_tensors(param) -> dict[str, torch.Tensor]:
    """bitsandbytes keeps 4-bit scales outside the parameter (``quant_state``); they are base weights too."""
    state = getattr(param, "quant_state", None)
    if state is None or not hasattr(state, "as_dict"):
        return {}
    return {k: v for k, v in state.as_dict(packed=True).items() if isinstance(v, torch.Tensor)}


def frozen_fingerprint(model) -> dict[str, str]:
    """Digest of every frozen parameter and buffer-like quantisation state, by name.

    For a quantised base this hashes the quantised storage (what is actually used), not a dequantised copy.
    """
    digests: dict[str, str] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        digests[name] = tensor_digest(param)
        for key, tensor in _quant_state_tensors(param).items():
            digests[f"{name}#{key}"] = tensor_digest(tensor)
    return digests


def combined_digest(digests: dict[str, str]) -> str:
    """One sha256 standing for a whole name -> digest mapping (order-independent)."""
    return sha256_text("".join(f"{name}\0{digests[name]}\n" for name in sorted(digests)))
