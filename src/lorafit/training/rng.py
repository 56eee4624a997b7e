"""Every random number generator a training step can draw from: captured into checkpoints (per process), put
back on resume, and preserved around evaluation and generation so that they never change what training draws."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def capture_rng() -> dict:
    """Every RNG a training step can draw from: python, numpy, torch CPU, and each accelerator device."""
    import random

    import numpy as np

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch_cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state_all()  # one per visible device
    if hasattr(torch, "mps") and torch.backends.mps.is_available():
        states["torch_mps"] = torch.mps.get_rng_state()
    return states


@contextmanager
def preserved_rng():
    """Run the block, then put every random number generator back where it was: evaluating and generating
    during training must not change the dropout masks training draws next (a run with evaluations trains exactly
    like one without)."""
    states = capture_rng()
    try:
        yield
    finally:
        restore_rng(states)


def restore_rng(states: dict) -> None:
    import random

    import numpy as np

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.random.set_rng_state(states["torch_cpu"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda"])
    if "torch_mps" in states and hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["torch_mps"])
