"""bf16 LoRA vs 4-bit QLoRA on a Llama-shaped 1.1B model with random weights: tokens/s and peak GPU memory.

Run on a machine with an NVIDIA GPU (nothing is downloaded: the model is built from a config):

    pip install -e '.[qlora]'
    python benchmarks/gpu_qlora.py --out /tmp/gpu-bench          # ~5 minutes on an H100

It writes the model folder once (TinyLlama-1.1B shapes: hidden 2048, 22 layers, 32 heads / 4 KV heads,
intermediate 5632, vocab 32000; the embedded tiny tokenizer, whose ids all fit), then for each mode runs
`lorafit train` in a fresh process on the bundled quickstart data and prints one Markdown row per mode for
docs/benchmarks.md. Peak memory is torch.cuda.max_memory_allocated over the training run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = {
    "bf16 LoRA": {"model.dtype": "bf16", "quant.bits": "null"},
    "QLoRA nf4 (bf16 compute)": {"model.dtype": "bf16", "quant.bits": "4", "quant.compute_dtype": "bf16"},
    "QLoRA nf4 + paged_adamw_8bit + checkpointing": {
        "model.dtype": "bf16", "quant.bits": "4", "quant.compute_dtype": "bf16",
        "train.optimizer": "paged_adamw_8bit", "train.gradient_checkpointing": "true",
    },
}
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)

RUNNER = textwrap.dedent("""
    import json, sys, torch
    from lorafit import load_config, train
    config = load_config(sys.argv[1], sys.argv[3:])
    torch.cuda.reset_peak_memory_stats()
    result = train(config, overwrite=True)
    json.dump({"tokens_per_second": result.metrics["tokens_per_second"],
               "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
               "train_loss_final": result.metrics["train_loss_final"]}, open(sys.argv[2], "w"))
""")


def build_model(folder: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from lorafit.model.tiny import build_tokenizer

    if (folder / "config.json").is_file():
        return
    tokenizer = build_tokenizer()
    config = LlamaConfig(**LLAMA_1B, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters -> {folder}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.out / "llama-1b-random"
    build_model(model_dir)
    config = args.out / "bench.yaml"
    data = REPO / "examples" / "data"
    config.write_text(
        f"model: {{path: {model_dir}}}\n"
        "lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}\n"
        f"data: {{train: [{{path: {data / 'quickstart_train.jsonl'}}}], max_seq_length: 256}}\n"
        f"train: {{output_dir: {args.out / 'run'}, max_steps: {args.steps}, batch_size: {args.batch_size}, "
        "learning_rate: 2.0e-4, log_every: 10}\n"
        "eval: {every: null, at_start: false}\n"
    )
    print("| mode | tokens/s (non-padding) | peak GPU memory (GiB) | final train loss |")
    print("| --- | --- | --- | --- |")
    for name, overrides in MODES.items():
        result_file = args.out / "result.json"
        sets = [f"{k}={v}" for k, v in overrides.items()]
        subprocess.run([sys.executable, "-c", RUNNER, str(config), str(result_file), *sets], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        r = json.loads(result_file.read_text())
        print(f"| {name} | {r['tokens_per_second']:,.0f} | {r['peak_gpu_gib']:.2f} | {r['train_loss_final']:.3f} |")


if __name__ == "__main__":
    main()
