"""Peak memory and speed of each training mode on the embedded tiny model, on this CPU (docs/hardware.md).

    PYTHONPATH=src python benchmarks/cpu_modes.py [--steps 20] [--batch-size 8]

Each mode trains in a fresh process (so peak RSS is that mode's own) on the bundled quickstart data and prints
one Markdown row. Tokens/s counts non-padding tokens over optimizer steps only (no evaluation). On a shared or
busy machine, compare rows of one invocation only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = {
    "fp32 LoRA": [],
    "bf16 LoRA (bf16 autocast)": ["model.dtype=bf16"],
    "4-bit NF4 QLoRA, fp32 compute": ["quant.bits=4", "quant.compute_dtype=fp32"],
    "4-bit NF4 QLoRA, bf16 compute": ["quant.bits=4", "quant.compute_dtype=bf16"],
    "8-bit base (LLM.int8), fp32": ["quant.bits=8", "quant.compute_dtype=fp32"],
    "fp32 LoRA + gradient checkpointing": ["train.gradient_checkpointing=true"],
}

RUNNER = textwrap.dedent("""
    import json, resource, sys
    from lorafit import load_config, train
    import transformers; transformers.utils.logging.set_verbosity_error()
    result = train(load_config(sys.argv[1], sys.argv[3:]), overwrite=True)
    json.dump({"tokens_per_second": result.metrics["tokens_per_second"],
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "loss": [result.metrics["train_loss_first"], result.metrics["train_loss_final"]]},
              open(sys.argv[2], "w"))
""")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only", nargs="*", help="Run only the modes whose name contains one of these words.")
    args = parser.parse_args()
    data = REPO / "examples" / "data" / "quickstart_train.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.yaml"
        config.write_text(
            "model: {path: 'lorafit:tiny'}\n"
            "lora: {r: 16, alpha: 32, dropout: 0.0}\n"
            f"data: {{train: [{{path: {data}}}], max_seq_length: 256}}\n"
            f"train: {{output_dir: {tmp}/run, max_steps: {args.steps}, batch_size: {args.batch_size}, "
            "learning_rate: 2.0e-3, log_every: 5}\n"
            "eval: {every: null, at_start: false}\n"
        )
        print(f"| mode | peak RSS (MiB) | tokens/s (non-padding) | train loss first -> last ({args.steps} steps) |")
        print("| --- | --- | --- | --- |")
        for name, overrides in MODES.items():
            if args.only and not any(word in name for word in args.only):
                continue
            out = Path(tmp) / "result.json"
            subprocess.run([sys.executable, "-c", RUNNER, str(config), str(out), *overrides], check=True,
                           env={**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            r = json.loads(out.read_text())
            print(f"| {name} | {r['peak_rss_mib']:,.0f} | {r['tokens_per_second']:,.0f} | "
                  f"{r['loss'][0]:.3f} -> {r['loss'][1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
