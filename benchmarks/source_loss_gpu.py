"""Per-source training loss on a GPU: no host-device synchronisation between logs, exact values, and its cost.

    python benchmarks/source_loss_gpu.py

Loads lorafit/training/source_loss.py (with model/token_logprobs.py) and window.py on their own (the GPU image has
torch but not lorafit's other dependencies). With torch.cuda.set_sync_debug_mode("error") every micro-batch of a
logging window (source_sums into the loop's MetricSums) must run without a sync (a sync raises); the values read
at the log must equal each source's loss computed separately. Then it times source_sums
against the forward + backward of the same batch's output layer (3B-like shape: 4 x 2048 tokens, 128k vocabulary).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import torch

labels_module = types.ModuleType("lorafit.data.labels")
labels_module.IGNORE_INDEX = -100
sys.modules.setdefault("lorafit", types.ModuleType("lorafit"))
sys.modules.setdefault("lorafit.data", types.ModuleType("lorafit.data"))
sys.modules["lorafit.data.labels"] = labels_module
sys.modules.setdefault("lorafit.model", types.ModuleType("lorafit.model"))
spec = importlib.util.spec_from_file_location(  # source_loss's token log-probabilities: torch and labels only
    "lorafit.model.token_logprobs", Path(__file__).resolve().parent.parent / "src/lorafit/model/token_logprobs.py")
sys.modules["lorafit.model.token_logprobs"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sys.modules["lorafit.model.token_logprobs"])
spec = importlib.util.spec_from_file_location(
    "source_loss", Path(__file__).resolve().parent.parent / "src/lorafit/training/source_loss.py")
source_loss = importlib.util.module_from_spec(spec)
spec.loader.exec_module(source_loss)
spec = importlib.util.spec_from_file_location(  # window.py imports torch only
    "window", Path(__file__).resolve().parent.parent / "src/lorafit/training/window.py")
window_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(window_module)
MetricSums = window_module.MetricSums


def batch(rows: int, length: int, vocab: int, sources: int, device: str, dtype=torch.bfloat16):
    logits = torch.randn(rows, length, vocab, device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (rows, length), device=device)
    labels[:, : length // 4] = -100  # a prompt that is not trained
    source_ids = torch.randint(0, sources, (rows, length), device=device)
    return logits, labels, source_ids


def reference(batches, sources: int) -> dict:
    sums, counts = [0.0] * sources, [0] * sources
    for logits, labels, ids in batches:
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], reduction="none")
        for s in range(sources):
            mask = (ids[:, 1:] == s) & (labels[:, 1:] != -100)
            sums[s] += float(nll[mask].double().sum())
            counts[s] += int(mask.sum())
    return {f"loss/s{s}": sums[s] / counts[s] for s in range(sources) if counts[s]}


def main() -> None:
    device = "cuda"
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    batches = [batch(2, 512, 32000, 3, device) for _ in range(4)]
    window = MetricSums()  # the loop's log window (training/window.py)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    for logits, labels, ids in batches:  # a logging window of 4 micro-batches: any sync raises here
        sums, counts = source_loss.source_sums(logits, labels, ids, 3)
        for s in range(3):
            window.add(f"loss/s{s}", sums[s], counts[s])
    torch.cuda.set_sync_debug_mode("default")
    out["no_sync_between_logs"] = True
    got = window.read()[0]
    want = reference(batches, 3)
    out["max_relative_error"] = max(abs(got[k] - want[k]) / want[k] for k in want)
    assert got.keys() == want.keys() and out["max_relative_error"] < 1e-5, (got, want)

    logits, labels, ids = batch(4, 2048, 128256, 4, device)
    hidden = torch.randn(4, 2048, 3072, device=device, dtype=torch.bfloat16, requires_grad=True)
    head = torch.randn(128256, 3072, device=device, dtype=torch.bfloat16) * 0.02

    def head_step():
        h = hidden @ head.T  # (B, T, V): the output layer, the largest single op of a step
        loss = torch.nn.functional.cross_entropy(h[:, :-1].float().reshape(-1, h.shape[-1]), labels[:, 1:].reshape(-1))
        loss.backward()
        return h

    def timed(fn, repeats=10) -> float:
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats * 1000

    def observe():
        return source_loss.source_sums(logits, labels, ids, 4)

    out["observe_ms_4x2048_v128k"] = round(timed(observe), 2)
    out["output_layer_fwd_bwd_ms_same_shape"] = round(timed(head_step), 2)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    observe()
    out["observe_extra_peak_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
