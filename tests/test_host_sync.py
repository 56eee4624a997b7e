"""No host-device synchronisation on a step that does not log.

On a CPU nothing synchronises, so a probe stands in: every conversion of a tensor to a Python value (``.item()``,
``.tolist()``, ``bool``/``int``/``float``/index) is counted while steps 3 to 10 of a run that logs only at steps 1
and 12 are trained. Conversions of the CPU batch while it is collated (host-side counts, before the batch moves
to the device) are not device reads and are left out. On a GPU, ``torch.cuda.set_sync_debug_mode("error")``
checks the real thing (tests/test_gpu.py)."""

from __future__ import annotations

import collections
import traceback
from pathlib import Path

import torch

from conftest import conversation, write_jsonl
from lorafit import LorafitCallback, load_config, train

CONVERSIONS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
PROBED_STEPS = range(3, 11)  # 8 steps; the run logs at step 1 and at its last step (12) only


class SyncProbe(LorafitCallback):
    """Counts tensor-to-Python conversions from ``on_step_begin(3)`` to ``on_step_begin(11)``, by where they came
    from (the innermost frame and its file)."""

    def __init__(self, monkeypatch):
        self.on = False
        self.found: collections.Counter = collections.Counter()
        for name in CONVERSIONS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))

    def _counting(self, original):
        def conversion(tensor, *args, **kwargs):
            if self.on:
                stack = traceback.extract_stack()[:-1]
                collating = any(f.name == "__call__" and f.filename.endswith("training/batches.py") or
                                "torch/utils/data" in f.filename for f in stack)
                if not collating:
                    self.found[f"{Path(stack[-1].filename).parent.name}/{Path(stack[-1].filename).name}:"
                               f"{stack[-1].lineno} ({original.__name__})"] += 1
            return original(tensor, *args, **kwargs)
        return conversion

    def on_train_begin(self, loop):
        self.loop = loop

    def on_step_begin(self, step, loop):
        self.on = step in PROBED_STEPS


def _run(tmp_path, model_dir, rows, monkeypatch, **data) -> SyncProbe:
    probe = SyncProbe(monkeypatch)
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    train(load_config({
        "model": {"path": str(model_dir), "dtype": "fp32"},
        "lora": {"r": 4, "dropout": 0.0},
        "data": {"train": [{"path": str(path)}], **data},
        # One epoch holds all 12 steps (no epoch-end save), checkpoints never, logging at steps 1 and 12.
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 12, "batch_size": 2, "grad_accum": 2,
                  "log_every": 100, "save_every": None, "seed": 0},
        "eval": {"every": None, "at_start": False},
    }), progress=False, callbacks=[probe])
    probe.on = False
    return probe


# transformers (5.23) itself reads one boolean per forward while it prepares the attention mask: whether a padding
# mask is all ones (padding_mask.all()) or, without a mask, whether position ids hold packed sequences. That read is
# the model's, not the loop's, and lorafit cannot skip it without reaching into transformers (docs/design.md).
TRANSFORMERS_MASK_CHECK = "transformers/masking_utils.py:"


def _lorafit_reads(probe: SyncProbe) -> dict:
    return {where: n for where, n in probe.found.items() if not where.startswith(TRANSFORMERS_MASK_CHECK)}


def test_eight_non_logging_steps_read_nothing_from_the_device(tmp_path, tiny_model_dir, monkeypatch):
    words = "red blue green black white orange purple yellow".split()
    rows = [conversation(f"Say {' '.join(words[: 1 + i % 6])}", " ".join(words[i % 5: i % 5 + 1 + i % 3]))
            for i in range(52)]
    probe = _run(tmp_path, tiny_model_dir, rows, monkeypatch)
    assert not _lorafit_reads(probe), f"lorafit reads the device on non-logging steps: {_lorafit_reads(probe)}"
    # What is left is transformers' mask check: at most two reads per forward (its padding-mask test runs in two
    # places), 8 steps x 2 micro-batches. More would mean a read per layer or per token, which is not the mask check.
    assert sum(probe.found.values()) <= 2 * 16, dict(probe.found)


def test_the_probe_sees_a_logging_step(tmp_path, tiny_model_dir, monkeypatch):
    """The probe is not blind: the same run logging every step reads the device at each of them."""
    probe = SyncProbe(monkeypatch)
    path = write_jsonl(tmp_path / "train.jsonl", [conversation(f"Copy {a}", a) for a in "0123456789"])
    train(load_config({
        "model": {"path": str(tiny_model_dir), "dtype": "fp32"}, "lora": {"r": 4, "dropout": 0.0},
        "data": {"train": [{"path": str(path)}]},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 2, "log_every": 1,
                  "save_every": None},
        "eval": {"every": None, "at_start": False},
    }), progress=False, callbacks=[probe])
    assert _lorafit_reads(probe), f"the probe saw no read on logging steps: {dict(probe.found)}"
