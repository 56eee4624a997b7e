"""The memory planner against real runs: predicted vs measured peak GPU memory, and the error.

    python benchmarks/planner_check.py OUT [--only NAME,NAME] [--steps 3] [--deadline 170]

For each case: a Llama-shaped model with random weights built on the GPU (benchmarks/gpu_throughput.py's
build_model: nothing downloaded), synthetic chats, then `lorafit plan`'s prediction (model/memory_plan.py) and a
real lorafit run of --steps optimizer steps in this process; measured = the run's torch.cuda.max_memory_allocated
(training_summary.json's gpu_allocated_peak_mb) minus what was allocated before it. Prints one JSON line per case
and a Markdown table. The planner's goal is to be within 15% (docs/planner.md). Needs CUDA; the whole default list
took 157 s on an H200 (2026-11-26).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_throughput  # noqa: E402  (the model builder and the synthetic chats of the throughput benchmark)

# 7B width with 8 of its 32 layers: the per-layer terms of the 7B/6GB plan, built and loaded in seconds.
gpu_throughput.SHAPES["7b-8l"] = {**gpu_throughput.SHAPES["7b"], "num_hidden_layers": 8}
BENCH = {"model.dtype": "bf16", "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.0, "data.packing": "bfd",
         "data.max_seq_length": 2048, "train.batch_size": 4, "model.attn_implementation": "sdpa", "model.kernels": "none"}
# (name, shape, overrides on BENCH, H200 peak measured by the throughput benchmark in GiB or None)
CASES = [
    ("3b bf16", "3b", {}, 54.8),
    ("3b bf16 checkpointing", "3b", {"train.gradient_checkpointing": True}, 20.3),
    ("3b qlora nf4", "3b", {"quant.bits": 4}, 62.4),
    ("3b defaults (auto kernels, dropout 0.05)", "3b",
     {"model.attn_implementation": "auto", "model.kernels": "auto", "lora.dropout": 0.05}, None),
    ("7b-6gb plan (8 of 32 layers)", "7b-8l", {"quant.bits": 4, "train.batch_size": 1,
                                               "train.gradient_checkpointing": True,
                                               "train.optimizer": "paged_adamw_8bit"}, None),
]


def config_for(out: Path, model: Path, data: Path, overrides: dict, steps: int):
    from lorafit import load_config

    sets = {**BENCH, **overrides}
    config = {"model": {"path": str(model)}, "data": {"train": [{"path": str(data)}], "truncation": "truncate",
                                                       "audit": False},
              "train": {"output_dir": str(out / "run"), "max_steps": steps, "learning_rate": 2e-4, "log_every": 1,
                        "save_every": None},
              "eval": {"every": None, "at_start": False, "generate_samples": 0}}
    for key, value in sets.items():
        section, name = key.split(".")
        config.setdefault(section, {})[name] = value
    if "quant" in config:
        config["quant"].update(compute_dtype="bf16")
    return load_config(config)


def check(out: Path, name: str, shape: str, overrides: dict, steps: int) -> dict:
    import torch

    from lorafit import train
    from lorafit.model.memory_plan import plan_config

    model = gpu_throughput.build_model(out, shape)
    data = gpu_throughput.write_chats(out, 300)
    config = config_for(out, model, data, overrides, steps)
    _, plan = plan_config(config, device="cuda")
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    started = time.time()
    result = train(config, overwrite=True, progress=False)
    # The run's own reading (training, before the artifact is written and verified), less what an earlier case left.
    measured = (result.metrics["gpu_allocated_peak_mb"] * 2**20 - before) / 2**30
    predicted = plan.peak / 2**30
    return {"case": name, "predicted_gib": round(predicted, 2), "measured_gib": round(measured, 2),
            "error_percent": round(100 * (predicted / measured - 1), 1), "seconds": round(time.time() - started, 1),
            "terms_gib": plan.as_dict()["terms_gib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", default="", help="Comma-separated case names (prefixes) to run.")
    parser.add_argument("--steps", type=int, default=3, help="Optimizer steps per case (optimizer states exist from step 2).")
    parser.add_argument("--deadline", type=float, default=170.0, help="Seconds; cases that would start later are skipped.")
    a = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("planner_check needs a CUDA GPU (the prediction is of GPU memory); `lorafit plan` runs anywhere")
    a.out.mkdir(parents=True, exist_ok=True)
    start, rows = time.time(), []
    wanted = [w for w in a.only.split(",") if w]
    for name, shape, overrides, reference in CASES:
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        if time.time() - start > a.deadline:
            rows.append({"case": name, "skipped": "deadline"})
            continue
        try:
            row = check(a.out, name, shape, overrides, a.steps)
        except Exception as exc:  # noqa: BLE001  one failed case must not hide the others' numbers
            row = {"case": name, "failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
        row["reference_h200_gib"] = reference
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{torch.cuda.get_device_name(0)}; {a.steps} steps per case; {time.time() - start:.0f} s in all\n")
    print("| case | predicted GiB | measured GiB | error | earlier H200 measurement |\n| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "predicted_gib" in r:
            print(f"| {r['case']} | {r['predicted_gib']:.1f} | {r['measured_gib']:.1f} | {r['error_percent']:+.1f}% "
                  f"| {r['reference_h200_gib'] or ''} |")
        else:
            print(f"| {r['case']} | {r.get('failed') or r.get('skipped')} | | | |")


if __name__ == "__main__":
    main()
