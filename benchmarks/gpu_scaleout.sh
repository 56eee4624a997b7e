#!/usr/bin/env bash
# Every distributed strategy once, with one process, on a CUDA GPU: ddp, fsdp, fsdp + QLoRA (bitsandbytes),
# deepspeed ZeRO-2 and ZeRO-3, each `lorafit train CONFIG --nproc 1` for 10 steps on a ~100M-parameter random
# Llama. Prints, per strategy: exit status, first and last loss, peak GPU memory, wall seconds. ~2 minutes.
#
#   PYTHONPATH=src bash benchmarks/gpu_scaleout.sh [WORKDIR]      (lorafit importable; deepspeed runs are skipped
#                                                                  when deepspeed is not installed)
set -uo pipefail
WORK=${1:-$(mktemp -d)}
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK"

# A ~100M-parameter Llama with the embedded tiny tokenizer, and 256 short chats.
$PY - "$WORK" <<'PY'
import json, sys
from pathlib import Path
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from lorafit.model.tiny import build_tokenizer

work = Path(sys.argv[1]); model_dir = work / "model"
if not (model_dir / "config.json").exists():
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(model_dir); tok.save_pretrained(model_dir)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters -> {model_dir}")
words = "model adapter token layer weight train data loss rank alpha batch step learn answer city name".split()
with open(work / "train.jsonl", "w") as f:
    for i in range(256):
        text = " ".join(words[(i * 7 + j) % len(words)] for j in range(20 + i % 40))
        f.write(json.dumps({"messages": [{"role": "user", "content": f"Repeat: {text}"},
                                         {"role": "assistant", "content": text}]}) + "\n")
PY
[ $? -eq 0 ] || { echo "could not build the model (needs CUDA and lorafit importable)"; exit 1; }

config() {  # name strategy quant-bits
  cat > "$WORK/$1.yaml" <<YAML
model: {path: $WORK/model, dtype: bf16}
lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}
quant: {bits: $3}
data: {train: [{path: $WORK/train.jsonl}], max_seq_length: 512}
train: {output_dir: $WORK/runs/$1, max_steps: 10, batch_size: 8, learning_rate: 1.0e-3, log_every: 1,
        save_every: 5, warmup_steps: 0}
eval: {every: null, at_start: false}
distributed: {strategy: $2}
artifact: {name: $1, version: 0.1.0}
YAML
}

printf '%-16s %-6s %-10s %-10s %-14s %s\n' strategy exit loss_first loss_last peak_gpu_mb seconds
for run in "ddp ddp null" "fsdp fsdp null" "fsdp_qlora fsdp 4" "zero2 deepspeed_zero2 null" "zero3 deepspeed_zero3 null"; do
  set -- $run
  if [[ $2 == deepspeed* ]] && ! $PY -c "import deepspeed" 2>/dev/null; then
    printf '%-16s %s\n' "$1" "skipped: deepspeed is not installed"; continue
  fi
  if [[ $3 == 4 ]] && ! $PY -c "import bitsandbytes" 2>/dev/null; then
    printf '%-16s %s\n' "$1" "skipped: bitsandbytes is not installed"; continue
  fi
  config "$1" "$2" "$3"
  start=$(date +%s)
  timeout 120 $PY -m lorafit train "$WORK/$1.yaml" --nproc 1 --overwrite > "$WORK/$1.log" 2>&1
  status=$?
  seconds=$(( $(date +%s) - start ))
  $PY - "$WORK/runs/$1/metrics_history.jsonl" "$1" "$status" "$seconds" <<'PY'
import json, sys
path, name, status, seconds = sys.argv[1:]
try:
    rows = [json.loads(l) for l in open(path) if l.strip()]
except OSError:
    rows = []
losses = [r["loss"] for r in rows if "loss" in r]
peak = max((r.get("gpu_allocated_peak_mb", 0) for r in rows), default=0)
fmt = lambda v: f"{v:.4f}" if v is not None else "-"
print(f"{name:<16} {status:<6} {fmt(losses[0] if losses else None):<10} {fmt(losses[-1] if losses else None):<10} "
      f"{peak:<14,.0f} {seconds}")
PY
  [ "$status" -eq 0 ] || tail -n 15 "$WORK/$1.log" | sed "s/^/    $1: /"
done
echo "logs and runs: $WORK"
