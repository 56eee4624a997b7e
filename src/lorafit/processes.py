"""Which process this is, before accelerate exists: the one place that reads the launcher's ``RANK``.

A launcher (torchrun, or ``lorafit train --nproc``) sets RANK before the process starts. Once the training loop has
its accelerate ``Accelerator``, the accelerator's ``is_main_process`` decides (training/loop.py hands it to the run
folder); before that, and in the CLI, which prints its first line before importing torch, this does. It imports
nothing heavy on purpose.
"""

from __future__ import annotations

import os


def launcher_rank() -> int:
    """This process's global rank as the launcher set it; 0 when nothing launched it."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """The process that writes files and prints summaries (rank 0), as far as the launcher says."""
    return launcher_rank() == 0
