"""The memory planner against real runs, on HELD-OUT cases: predicted vs measured peak GPU memory, and the error.

    python benchmarks/planner_check.py OUT [--only NAME,NAME] [--steps 3] [--deadline 540] [--examples 300]
    python benchmarks/planner_check.py OUT --dry-run [--cpu-smoke]   # no GPU: each case's config and prediction

Held-out: nothing in model/memory_terms.py was fitted on these cases (the activation terms are counted from the
tensors autograd saves, the loss term derived; tests/test_plan*.py check both on a CPU). Keep it so: a constant
changed to match one of these numbers makes that case in-sample (model/memory_accuracy.py says where to note it).

For each case: a Llama-shaped model with random weights built on the GPU (benchmarks/gpu_throughput.py's
build_model: nothing downloaded), synthetic data, then `lorafit plan`'s prediction (model/memory_plan.py) and a
real lorafit run of --steps optimizer steps in this process; measured = the run's torch.cuda.max_memory_allocated
(training_summary.json's gpu_allocated_peak_mb) minus what was allocated before it. Padded cases use data where
about half the examples are cut at max_seq_length and length grouping is off, so the steps run see the planned
worst batch: a full-length row with shorter, padded ones. Writes OUT/planner_check.json (one row per case), the
Markdown table for docs/planner.md (OUT/planner_check.md) and, last, the ``MEASURED`` dict for
model/memory_accuracy.py. --dry-run builds each model folder without weights (config.json and tokenizer: what
the planner reads) and prints the predictions and the features each case measures; with --cpu-smoke it also trains
each case's data and config one step on the CPU with a tiny model. tests/test_plan_objectives.py runs both.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_throughput  # noqa: E402  (the model builder and the synthetic chats of the throughput benchmark)

# Another vocabulary and GQA ratio: Qwen2.5-1.5B's sizes (152k vocabulary, 12 query heads per 2 KV heads) as a Llama.
gpu_throughput.SHAPES["gqa6"] = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                     num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=8192)
BENCH = {"model.dtype": "bf16", "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.0, "data.packing": "none",
         "data.max_seq_length": 2048, "train.batch_size": 4, "train.group_by_length": False,
         "model.attn_implementation": "sdpa", "model.kernels": "none"}
# (name, shape, overrides on BENCH, data: chats or pairs). The default layout (padded rows) first.
CASES = [
    ("3b padded (default layout)", "3b", {}, "chats"),
    ("3b packed rows per bin", "3b", {"data.packing": "bfd"}, "chats"),
    ("1.5b shape, vocab 152k, GQA 6:1, padded", "gqa6", {}, "chats"),
    ("3b qlora nf4, padded", "3b", {"quant.bits": 4}, "chats"),
    ("3b dpo, 2 pairs x 1024", "3b", {"objective.type": "dpo", "data.max_seq_length": 1024, "train.batch_size": 2},
     "pairs"),
    ("8b padded, batch 2", "8b", {"train.batch_size": 2}, "chats"),
]


def write_data(out: Path, kind: str, count: int, longest_words: int) -> Path:
    """chats: about half run past max_seq_length (cut there, truncation: truncate), the rest shorter. pairs: a chosen
    answer past max_seq_length, a shorter rejected one. Either way the steps see full-length rows with padded ones."""
    path = out / f"{kind}-{count}-{longest_words}.jsonl"
    rng = random.Random(0)
    words = "model adapter token layer weight train data loss rank alpha batch step learn answer city name".split()
    text = lambda n: " ".join(rng.choices(words, k=n))  # noqa: E731  (~1.5 tokens per word)
    with path.open("w") as fh:
        for i in range(count):
            long, short = longest_words * 2, rng.randint(longest_words // 8, longest_words // 2)
            row = ({"prompt": text(60), "chosen": text(long), "rejected": text(short)} if kind == "pairs" else
                   {"messages": [{"role": "user", "content": text(60)},
                                 {"role": "assistant", "content": text(long if i % 2 == 0 else short)}]})
            fh.write(json.dumps(row) + "\n")
    return path


def model_folder(out: Path, shape: str, *, weights: bool) -> Path:
    if weights:
        return gpu_throughput.build_model(out, shape)
    from transformers import LlamaConfig

    from lorafit.model.tiny import build_tokenizer

    folder = out / f"meta-{shape}"
    tokenizer = build_tokenizer()
    LlamaConfig(**gpu_throughput.SHAPES[shape], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def config_for(out: Path, model: Path, data: Path, kind: str, overrides: dict, steps: int):
    from lorafit import load_config

    source = {"path": str(data)} | ({"format": "preference"} if kind == "pairs" else {})
    config = {"model": {"path": str(model)}, "data": {"train": [source], "truncation": "truncate", "audit": False},
              "train": {"output_dir": str(out / "run"), "max_steps": steps, "learning_rate": 2e-4, "log_every": 1,
                        "save_every": None},
              "eval": {"every": None, "at_start": False, "generate_samples": 0}}
    for key, value in {**BENCH, **overrides}.items():
        section, name = key.split(".")
        config.setdefault(section, {})[name] = value
    if "quant" in config:
        config["quant"].update(compute_dtype="bf16")
    return load_config(config)


def cpu_smoke(out: Path, case: tuple, examples: int) -> dict:
    """The case's data and config, on the CPU with a tiny model of the same kind (fp32, rows of 256): one real
    lorafit step, so a GPU session never finds a config or data error. A k-bit base needs CUDA: left out."""
    from lorafit import train

    name, _, overrides, kind = case
    if "quant.bits" in overrides:
        return {"case": name, "cpu_smoke": "left out (a 4-bit base needs CUDA)"}
    sets = {**overrides, "model.dtype": "fp32", "data.max_seq_length": 256}
    config = config_for(out, model_folder(out, "tiny", weights=True), write_data(out, kind, examples, 256), kind, sets, 1)
    train(config, overwrite=True, progress=False)
    return {"case": name, "cpu_smoke": "one step trained"}


def check(out: Path, case: tuple, steps: int, examples: int, *, dry_run: bool) -> dict:
    from lorafit.model.memory_accuracy import features
    from lorafit.model.memory_plan import plan_config

    name, shape, overrides, kind = case
    model = model_folder(out, shape, weights=not dry_run)
    longest = int({**BENCH, **overrides}["data.max_seq_length"])  # ~1.5 tokens per word: 2 x this is always cut
    data = write_data(out, kind, examples, longest)
    config = config_for(out, model, data, kind, overrides, steps)
    inp, plan = plan_config(config, device="cuda", use_cache=False)
    row = {"case": name, "predicted_gib": round(plan.peak / 2**30, 2), "features": features(inp.setup),
           "micro_batch": [inp.setup.rows, inp.setup.row_tokens], "terms_gib": plan.as_dict()["terms_gib"],
           "phases_gib": plan.as_dict()["phases_gib"]}
    if dry_run:
        return row
    import torch

    from lorafit import train

    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    started = time.time()
    result = train(config, overwrite=True, progress=False)
    # The run's own reading (training, before the artifact is written and verified), less what an earlier case left.
    measured = (result.metrics["gpu_allocated_peak_mb"] * 2**20 - before) / 2**30
    return row | {"measured_gib": round(measured, 2), "error_percent": round(100 * (plan.peak / 2**30 / measured - 1), 1),
                  "seconds": round(time.time() - started, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| held-out case (LoRA r16 all-linear, bf16, sdpa) | micro-batch | predicted GiB | measured GiB | error |",
             "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        batch = f"{r['micro_batch'][0]} x {r['micro_batch'][1]}" if "micro_batch" in r else ""
        if "measured_gib" in r:
            lines.append(f"| {r['case']} | {batch} | {r['predicted_gib']:.2f} | {r['measured_gib']:.2f} "
                         f"| {r['error_percent']:+.1f}% |")
        else:
            why = r.get("failed") or r.get("skipped") or "not yet measured on a GPU"
            lines.append(f"| {r['case']} | {batch} | {r.get('predicted_gib', '')} | {why} | |")
    return "\n".join(lines)


def versions() -> str:
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", default="", help="Comma-separated case names (prefixes) to run.")
    parser.add_argument("--steps", type=int, default=3, help="Optimizer steps per case (optimizer states exist from step 2).")
    parser.add_argument("--deadline", type=float, default=540.0, help="Seconds; cases that would start later are skipped.")
    parser.add_argument("--examples", type=int, default=300, help="Synthetic examples per data file.")
    parser.add_argument("--dry-run", action="store_true", help="No GPU: each case's config and prediction only.")
    parser.add_argument("--cpu-smoke", action="store_true", help="With --dry-run: also train each case's data and "
                        "config one step on the CPU with a tiny model.")
    a = parser.parse_args(argv)
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        sys.exit("planner_check needs a CUDA GPU (the prediction is of GPU memory); --dry-run runs anywhere")
    a.out.mkdir(parents=True, exist_ok=True)
    start, rows = time.time(), []
    wanted = [w for w in a.only.split(",") if w]
    for case in CASES:
        if wanted and not any(case[0].startswith(w) for w in wanted):
            continue
        if time.time() - start > a.deadline:
            rows.append({"case": case[0], "skipped": "deadline"})
            continue
        try:
            row = check(a.out, case, a.steps, a.examples, dry_run=a.dry_run)
            if a.dry_run and a.cpu_smoke:
                row |= cpu_smoke(a.out, case, a.examples)
        except Exception as exc:  # noqa: BLE001  one failed case must not hide the others' numbers
            if a.dry_run:
                raise
            row = {"case": case[0], "failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    device = "dry run, no GPU" if a.dry_run else torch.cuda.get_device_name(0)
    head = f"{device}; {versions()}; {a.steps} steps per case; {time.time() - start:.0f} s in all"
    (a.out / "planner_check.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    (a.out / "planner_check.md").write_text(f"{head}\n\n{table(rows)}\n")
    print(f"\n{head}\n\n{table(rows)}")
    if not a.dry_run:  # for model/memory_accuracy.py
        cases = {r["case"]: (r["error_percent"], r["features"]) for r in rows if "error_percent" in r}
        print("\nMEASURED = " + repr({"date": time.strftime("%Y-%m-%d"), "device": device, "versions": versions(),
                                      "cases": cases}))
    return rows


if __name__ == "__main__":
    main()
