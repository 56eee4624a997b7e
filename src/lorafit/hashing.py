"""Every sha256 lorafit computes, in one place: bytes, text, canonical JSON, files (streamed), folders, tensors
(raw bytes), token sequences, and one digest standing for many. Bottom layer: no lorafit imports; torch only
where a tensor is hashed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """sha256 of a file, streamed in 1 MiB chunks (base weights can be many GB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_json(value) -> str:
    """sha256 of ``value`` as canonical JSON (sorted keys), so equal content gives equal digests."""
    return sha256_text(json.dumps(value, sort_keys=True))


def folder_digest(folder: Path) -> str:
    """sha256 over the names and bytes of every file in ``folder`` (sorted): equal digests, equal folders."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def token_sequences_digest(sequences) -> str:
    """sha256 of integer sequences in order (each as int64 bytes, prefixed by its length so boundaries count)."""
    import array

    digest = hashlib.sha256()
    for sequence in sequences:
        values = array.array("q", sequence)
        digest.update(len(values).to_bytes(8, "little"))
        digest.update(values.tobytes())
    return digest.hexdigest()


def tensor_digest(tensor) -> str:
    """sha256 of a tensor's bytes (dtype and shape folded in, so a reinterpretation is never 'equal')."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    digest = hashlib.sha256(f"{tensor.dtype}:{tuple(tensor.shape)}:".encode())
    if tensor.numel():
        import torch

        digest.update(tensor.view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def combined_digest(digests: dict[str, str]) -> str:
    """One sha256 standing for a whole name -> digest mapping (order-independent)."""
    return sha256_text("".join(f"{name}\0{digests[name]}\n" for name in sorted(digests)))
