"""Shared fixtures: everything is built here, offline, in seconds."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported anywhere: nothing may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compute thread (here and in every CLI subprocess, which inherits it) unless the caller says otherwise. On 2
# idle cores a short test run takes the same wall time with 1 or 2 threads (start-up dominates), while on a busy
# shared machine every extra thread competes for the cores the other processes need (the quickstart trained at
# 69 tokens/s at load 6-9 against 3,700 idle, benchmarks/README.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """The embedded tiny model is built once per session into a private cache, never the user's."""
    os.environ["LORAFIT_CACHE"] = str(tmp_path_factory.mktemp("lorafit-cache"))
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny Llama with all-random weights: the loop's arithmetic tests (parity with a plain loop and with TRL,
    batch layouts, pinned curves) compare float32 results at 1e-5/1e-6. The shipped model's constructed heads
    (model/tiny_weights.py) are near-saturated softmaxes over O(10) activations, where float32 noise alone reaches
    those tolerances; that model is tested where it matters, by what it learns (tests/test_tiny_model.py,
    tests/test_cli.py::test_quickstart_learns) and by every test that trains ``lorafit:tiny``."""
    from lorafit.model.tiny import ensure_tiny_model

    return ensure_tiny_model(constructed=False)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def conversation(user: str, answer: str, system: str | None = None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages}


SAY_WORDS = "red blue green black".split()


def train_said_twice(folder: Path, model_dir: Path, **sections):
    """An fp32 LoRA taught to answer 'Say X' with 'X X' (40 steps, about 30 s); ``sections`` add config sections."""
    from lorafit import load_config, train

    data = write_jsonl(folder / "train.jsonl", [conversation(f"Say {w}", f"{w} {w}") for w in SAY_WORDS])
    return train(load_config({
        "model": {"path": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": [{"path": str(data)}], "max_seq_length": 64},
        "train": {"output_dir": str(folder / "run"), "max_steps": 40, "batch_size": 4, "learning_rate": 3e-3,
                  "scheduler": "constant", "log_every": 10, "seed": 1},
        "eval": {"every": None, "at_start": False},
        **sections,
    }))



import torch  # noqa: E402  (after OMP_NUM_THREADS above)

from lorafit import LorafitCallback  # noqa: E402


class FirstGrads(LorafitCallback):
    """The gradients of the first optimizer step, as the optimizer is about to see them (after clipping)."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, step, loop):
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in loop.model.named_parameters() if p.requires_grad}
