"""Pinned loss curves (torchtune's regression tests): 20 steps of SFT, DPO, ORPO and the contrastive objective on
the all-random tiny model (the tiny_model_dir fixture), each step's training loss pinned to 1e-4 in tests/data/pinned_curves.json.

A change in these numbers is a change in what training computes (masks, normalisation, accumulation, schedule,
optimizer, the objective's formula, the data order): the failure names the objective and the first step that moved.
If the change is intended, say why in the commit and re-pin:

    HF_HUB_OFFLINE=1 PYTHONPATH=src:tests .venv/bin/python tests/test_pinned_curves.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import conversation, write_jsonl  # noqa: E402

from lorafit import load_config, train  # noqa: E402
from lorafit.data.sample_preference import generate_pairs  # noqa: E402
from lorafit.data.sample_triplets import generate_triplets  # noqa: E402

PINNED = Path(__file__).parent / "data" / "pinned_curves.json"
STEPS = 20
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _rows(objective: str) -> list[dict]:
    if objective in ("dpo", "orpo"):
        return generate_pairs(n_train=24, n_eval=0, seed=7)[0]
    if objective == "contrastive":
        return generate_triplets(n_train=12, n_eval=0, seed=7)[0]
    return [conversation(f"Repeat {' '.join(WORDS[: 1 + i % 5])}", " ".join(WORDS[i % 7: i % 7 + 1 + i % 4]))
            for i in range(24)]


OBJECTIVES = {
    "sft": {"type": "sft"},
    "dpo": {"type": "dpo", "beta": 0.1},
    "orpo": {"type": "orpo", "beta": 0.1},
    "contrastive": {"type": "contrastive", "lambda_causal": 0.5, "lambda_task": 0.7},
}


def curve(objective: str, folder: Path, model_dir: Path) -> list[float]:
    """The 20 per-step training losses of ``objective``'s run (batch 2, accumulation 2, cosine, clipping)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", _rows(objective))
    result = train(load_config({
        "model": {"path": str(model_dir), "dtype": "fp32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "objective": OBJECTIVES[objective],
        "data": {"train": [{"path": str(folder / "train.jsonl")}], "max_seq_length": 256, "audit": False},
        "train": {"output_dir": str(folder / "run"), "max_steps": STEPS, "batch_size": 2, "grad_accum": 2,
                  "learning_rate": 2e-3, "scheduler": "cosine", "warmup_ratio": 0.1, "max_grad_norm": 1.0,
                  "log_every": 1, "save_every": None, "seed": 11},
        "eval": {"every": None, "at_start": False, "generate_samples": 0},
    }), progress=False)
    records = [json.loads(line) for line in (result.run_dir / "metrics_history.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_the_loss_curve_is_the_pinned_one(objective, tmp_path, tiny_model_dir):
    pinned = json.loads(PINNED.read_text())
    assert pinned["steps"] == STEPS
    expected = pinned["curves"][objective]
    got = curve(objective, tmp_path, tiny_model_dir)
    assert len(got) == STEPS, got
    moved = [(step, want, have) for step, (want, have) in enumerate(zip(expected, got), start=1)
             if abs(want - have) > 1e-4]
    assert not moved, (f"{objective}: the loss curve moved, first at step {moved[0][0]}: pinned {moved[0][1]}, "
                       f"now {moved[0][2]} ({len(moved)} of {STEPS} steps differ; see this file's docstring)")


if __name__ == "__main__":  # re-pin (see the docstring)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)  # as under pytest (tests/conftest.py)
    from lorafit.model.tiny import ensure_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LORAFIT_CACHE"] = str(Path(tmp) / "cache")
        model_dir = ensure_tiny_model(constructed=False)  # as the tiny_model_dir fixture (tests/conftest.py)
        curves = {name: curve(name, Path(tmp) / name, model_dir) for name in OBJECTIVES}
    PINNED.write_text(json.dumps({"steps": STEPS, "model": model_dir.name, "curves": curves}, indent=1) + "\n")
    print(f"pinned {', '.join(curves)} in {PINNED}")
