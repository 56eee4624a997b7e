#!/usr/bin/env bash
# Regenerate requirements/lock-cpu.txt: a clean venv, torch first, then lorafit with the extras we test.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --quiet "${TORCH_SPEC:-torch==2.13.0}"
"$tmp/venv/bin/pip" install --quiet -e ".[dev,qlora]"
{
  echo "# Exact versions tested on CPU (Python 3.11, torch 2.13.0 installed first; see Makefile). Regenerate with"
  echo "# scripts/lock.sh after changing pyproject.toml ranges."
  "$tmp/venv/bin/pip" freeze --exclude-editable | grep -v -E '^(torch|lorafit)=='
} > requirements/lock-cpu.txt
rm -rf "$tmp"
