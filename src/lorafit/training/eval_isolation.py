"""Evaluation that leaves training untouched: a run with frequent evaluation trains exactly like one without.

Two things leaked from evaluation into training, both silently:
- **Random state.** Every DataLoader iteration draws its base seed from the global torch RNG, and evaluation
  iterates the eval loader; the next epoch's shuffle, adapter dropout and anything else drawn afterwards then
  differ. ``preserved_rng`` saves and restores python, numpy, torch (CPU and every CUDA device) RNG states.
- **4-bit weights on CPU** (bitsandbytes): see ``lorafit.model.quantization.keep_4bit_training_layout``.

``IsolatedEvalTrainer`` is transformers' Trainer with ``evaluate`` wrapped in ``preserved_rng``; Trainer's own
periodic and at-start evaluations go through ``evaluate``, so they are covered. Code that generates samples
during training should use ``preserved_rng`` the same way.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch
from transformers import Trainer


@contextmanager
def preserved_rng():
    """Run the block, then put every random number generator back where it was."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


class IsolatedEvalTrainer(Trainer):
    """Trainer whose evaluations consume no randomness that training would see."""

    def evaluate(self, *args, **kwargs):
        with preserved_rng():
            return super().evaluate(*args, **kwargs)
