"""Test-only: slows every checkpoint file write by $LORAFIT_TEST_PAUSE_IN_SAVE seconds, so a test can kill or
interrupt a run while a checkpoint is half written. Python imports ``sitecustomize`` at start-up from the path, so
putting this folder first on PYTHONPATH (``scripts/kill_resume.py: slow_save_env``) reaches every process of a run,
torchrun's workers included, and lorafit's own code carries no test hook."""

import os

if os.environ.get("LORAFIT_TEST_PAUSE_IN_SAVE"):
    import time

    import lorafit.training.checkpoint as checkpoint

    _write = checkpoint.write_durable

    def _slow_write(*args, **kwargs):
        _write(*args, **kwargs)
        time.sleep(float(os.environ["LORAFIT_TEST_PAUSE_IN_SAVE"]))

    checkpoint.write_durable = _slow_write
