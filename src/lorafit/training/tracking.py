"""Experiment trackers: which are installed, their Trainer callbacks, and the offline environment they run in."""

from __future__ import annotations

import os

from lorafit.config import Config
from lorafit.run_folder import RunFolder


def tracker_callbacks(config: Config, run: RunFolder, *, purge_step: int | None) -> list:
    """One Trainer callback per tracker in tracking.report_to. lorafit creates them (TrainingArguments gets
    report_to="none") so they sit after MetricsHistory in the callback order and log its derived values."""
    names = list(config.tracking.report_to)
    callbacks = []
    others = [n for n in names if n != "tensorboard"]
    if others:
        from transformers.integrations import get_reporting_integration_callbacks

        callbacks += [cls() for cls in get_reporting_integration_callbacks(others)]
    if "tensorboard" in names and run.main_process:  # the writer creates its event file at once
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        # purge_step: a resumed run drops the events the killed run logged after its checkpoint
        writer = SummaryWriter(log_dir=str(run / run.TENSORBOARD), purge_step=purge_step)
        callbacks.append(TensorBoardCallback(writer))
    return callbacks


class offline_tracking_env:
    """MLflow and W&B write into the run folder with no network, unless the user's environment says otherwise.

    Variables are set only for the run and restored after, so runs in one process do not leak into each other.
    """

    def __init__(self, config: Config, run: RunFolder):
        wanted = {}
        if "mlflow" in config.tracking.report_to:
            # MLflow 3.x refuses its file store unless allowed; the database store would need SQLAlchemy and a server
            # is network: a folder in the run is what "local" means here.
            wanted |= {"MLFLOW_TRACKING_URI": (run / "mlruns").as_uri(), "MLFLOW_EXPERIMENT_NAME": config.artifact.name,
                       "MLFLOW_ALLOW_FILE_STORE": "true"}
        if "wandb" in config.tracking.report_to:
            wanted |= {"WANDB_MODE": "offline", "WANDB_DIR": str(run.path), "WANDB_PROJECT": config.artifact.name,
                       "WANDB_SILENT": "true"}
        self.wanted = wanted
        self.saved: dict[str, str | None] = {}

    def __enter__(self):
        for key, value in self.wanted.items():
            if key not in os.environ:
                self.saved[key] = None
                os.environ[key] = value
        return self

    def __exit__(self, *exc):
        for key in self.saved:
            os.environ.pop(key, None)
        return False
