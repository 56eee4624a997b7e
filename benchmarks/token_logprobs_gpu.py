"""The token log-probability function (src/lorafit/model/token_logprobs.py) on a GPU: no host sync, values, peak
extra memory and time against the whole-batch float32 upcast it replaced.

    python benchmarks/token_logprobs_gpu.py                  # CUDA, 16 x 2048 tokens, 128k vocabulary, bf16
    python benchmarks/token_logprobs_gpu.py --device cpu --rows 2 --tokens 256 --vocab 8000   # a smoke run

Loads token_logprobs.py on its own (the GPU image has torch but not lorafit's other dependencies). Under
torch.cuda.set_sync_debug_mode("error") forward and backward must not synchronise. Peak extra memory is
max_memory_allocated minus what was allocated before the call (the logits, and for the backward their gradient,
counted apart). Prints one JSON object; the CPU test of the same bound is tests/test_token_logprobs.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import torch

labels_module = types.ModuleType("lorafit.data.labels")
labels_module.IGNORE_INDEX = -100
for name in ("lorafit", "lorafit.data"):
    sys.modules.setdefault(name, types.ModuleType(name))
sys.modules["lorafit.data.labels"] = labels_module
spec = importlib.util.spec_from_file_location(
    "token_logprobs", Path(__file__).resolve().parent.parent / "src/lorafit/model/token_logprobs.py")
tl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tl)


def whole_batch(logits, targets):
    """The rule it replaced (DPO's answer_logps, lorafit eval): the whole batch upcast at once."""
    full = logits.float()
    return full.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(full, -1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    args = parser.parse_args()
    device, cuda = torch.device(args.device), args.device.startswith("cuda")
    out: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                 "shape": [args.rows, args.tokens, args.vocab], "chunk_bytes": tl.CHUNK_BYTES,
                 "full_fp32_copy_mb": round(args.rows * args.tokens * args.vocab * 4 / 2**20, 1)}
    torch.manual_seed(0)
    logits = torch.empty(args.rows, args.tokens, args.vocab, device=device, dtype=torch.bfloat16).normal_(0, 4)
    targets = torch.randint(0, args.vocab, (args.rows, args.tokens), device=device)
    targets[:, : args.tokens // 4] = -100

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def peak(fn) -> tuple[float, object]:
        """(extra MiB at the peak of fn(), its result); CUDA only."""
        if not cuda:
            return float("nan"), fn()
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        sync()
        return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1), result

    def timed(fn, repeats=5) -> float:
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return round((time.perf_counter() - start) / repeats * 1000, 2)

    with torch.no_grad():
        out["forward_extra_peak_mb"], got = peak(lambda: tl.token_logprobs(logits, targets))
        out["whole_batch_extra_peak_mb"], want = peak(lambda: whole_batch(logits, targets))
        mask = targets != -100
        out["max_abs_diff_vs_whole_batch"] = float((got - want)[mask].abs().max())
        out["forward_ms"] = timed(lambda: tl.token_logprobs(logits, targets))
        out["whole_batch_forward_ms"] = timed(lambda: whole_batch(logits, targets))
    del want

    leaf = logits.requires_grad_()
    weights = torch.randn(targets.shape, device=device)

    def backward():
        (tl.token_logprobs(leaf, targets) * weights).sum().backward()
        grad_bytes = leaf.grad.nelement() * leaf.grad.element_size()
        leaf.grad = None
        return grad_bytes

    extra, grad_bytes = peak(backward)
    out["forward_backward_extra_peak_mb"] = extra
    out["of_which_logits_grad_mb"] = round(grad_bytes / 2**20, 1)
    out["forward_backward_ms"] = timed(backward)
    if cuda:
        sync()
        torch.cuda.set_sync_debug_mode("error")  # any host sync below raises
        with torch.no_grad():
            tl.token_logprobs(logits, targets)
        backward()
        torch.cuda.set_sync_debug_mode("default")
        out["no_host_sync"] = True
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
