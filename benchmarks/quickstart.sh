#!/usr/bin/env bash
# Time the quickstart in a scratch folder with a fresh model cache, and print its summary numbers.
# PYTHON=/path/to/venv/bin/python picks another environment (default: the repo's .venv); this checkout's src runs.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
cd "$work"
export LORAFIT_CACHE="$work/cache" HF_HUB_OFFLINE=1
start=$(date +%s.%N)
PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-$repo/.venv/bin/python}" -m lorafit train --overwrite
end=$(date +%s.%N)
python3 - "$work/runs/quickstart/training_summary.json" "$start" "$end" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
m, g = summary["metrics"], summary.get("generation") or {}
held_out = " | ".join(f"{k} {g['base'][k]:.3f} -> {g['adapter'][k]:.3f}" for k in ("json_valid", "field_accuracy")
                      if k in g.get("adapter", {}))
print(f"wall {float(sys.argv[3]) - float(sys.argv[2]):.1f} s | training {m['train_seconds']} s | "
      f"{m['tokens_per_second']:,.0f} tok/s | eval loss {m['eval_loss_first']:.3f} -> {m['eval_loss_final']:.3f} "
      f"({100 * m['eval_loss_reduction']:.1f}% lower) | {held_out}")
PY
rm -rf "$work"
