"""DPO and the contrastive objective under 2 DDP processes (gloo, `lorafit train --nproc 2`): the same adapter,
losses and objective metrics as 1 process with twice the batch, and early stopping that stops both processes at
the same step (a per-process decision would leave one waiting in a collective forever: the run would hang).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_contrastive_training import _config as contrastive_config
from test_distributed import TOLERANCE, _adapter, _finish, _history, _launch
from test_preference import _config as preference_config

from lorafit import load_config, train

# eval every 2 steps, no improvement by 100 counts: step 2 is the best, step 4 is stale -> both layouts stop at 4
EARLY_STOP = {"every": 2, "at_start": False, "generate_samples": 0, "best": {"patience": 1, "min_delta": 100}}
TRAIN = {"max_steps": 8, "learning_rate": 1e-2, "save_every": 2}
CASES = {
    # metric logged by the objective at each step, and the eval metric the two layouts must agree on
    "dpo": (preference_config, {"type": "dpo", "beta": 0.1}, {}, "reward_margin", "eval_reward_margin"),
    "contrastive": (contrastive_config, None, {"attack": {"samples": 0}}, "causal_stability", "eval_loss"),
}


def _layout(make, folder: Path, model_dir: Path, objective, eval_extra: dict, *, batch_size: int) -> Path:
    return make(folder, model_dir, objective=objective, train_overrides={**TRAIN, "batch_size": batch_size},
                eval_section={**EARLY_STOP, **eval_extra})


@pytest.mark.parametrize("name", CASES)
def test_two_processes_equal_one_with_twice_the_batch_and_stop_early_together(name, tmp_path, tiny_model_dir):
    make, objective, eval_extra, step_metric, eval_metric = CASES[name]
    two_config = _layout(make, tmp_path / "two", tiny_model_dir, objective, eval_extra, batch_size=2)
    proc = _launch(two_config)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train(load_config(_layout(make, tmp_path / "one", tiny_model_dir, objective, eval_extra, batch_size=4)),
                    progress=False)
    finally:
        torch.set_num_threads(before)
    _finish(proc, timeout=400)  # a hang (one process stopped, one waiting) would time out here
    two_run = Path(yaml.safe_load(two_config.read_text())["train"]["output_dir"])

    assert one.best["stopped_early_at"] == 4
    summary = json.loads((two_run / "training_summary.json").read_text())
    assert summary["metrics"]["steps"] == 4, summary["metrics"]
    a, b = _adapter(two_run), _adapter(one.run_dir)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < TOLERANCE, worst
    h2, h1 = _history(two_run), _history(one.run_dir)
    steps2 = {r["step"]: r for r in h2 if "loss" in r}
    steps1 = {r["step"]: r for r in h1 if "loss" in r}
    assert sorted(steps2) == sorted(steps1) == [1, 2, 3, 4]  # one line per step, not one per process
    for step, record in steps1.items():
        # the objective's own metrics are reduced over both processes, not rank 0's half
        assert steps2[step]["loss"] == pytest.approx(record["loss"], abs=1e-5)
        assert steps2[step][step_metric] == pytest.approx(record[step_metric], abs=1e-4)
    evals2 = [r[eval_metric] for r in h2 if eval_metric in r]
    evals1 = [r[eval_metric] for r in h1 if eval_metric in r]
    assert len(evals1) == 2 and evals2 == pytest.approx(evals1, abs=1e-5)
