"""Experiment trackers (TensorBoard, MLflow, W&B): each receives every logged step's values, derived ones
included, and the resolved config; and the offline environment they run in.

Written here rather than taken from transformers' integrations because those are Trainer callbacks (they read
TrainingArguments and TrainerState); what a tracker needs from a run is three calls: start with the config, log
values at a step, finish.
"""

from __future__ import annotations

import os

from lorafit.config import Config
from lorafit.run_folder import RunFolder


class Trackers:
    """The trackers of ``tracking.report_to``; only the main process reports (``run.main_process``)."""

    def __init__(self, config: Config, run: RunFolder, *, purge_step: int | None):
        self.writers = []
        if not run.main_process:
            return
        names = config.tracking.report_to
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events the killed run logged after its checkpoint
            writer = SummaryWriter(log_dir=str(run / run.TENSORBOARD), purge_step=purge_step)
            self.writers.append(_TensorBoard(writer))
        if "mlflow" in names:
            self.writers.append(_MLflow(config))
        if "wandb" in names:
            self.writers.append(_WandB(config))

    def log(self, step: int, values: dict) -> None:
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for writer in self.writers:
            writer.log(step, numbers)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []


def _flat_config(config: Config) -> dict[str, str]:
    out = {}

    def walk(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = str(value)[:500]  # MLflow caps a parameter value at 500 characters

    walk(config.to_dict(), "")
    return out


class _TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def log(self, step: int, values: dict) -> None:
        for key, value in values.items():
            # eval_loss -> eval/loss, loss -> train/loss: the layout transformers' TensorBoard callback used
            tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, config: Config):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", config.artifact.name))
        mlflow.start_run()
        params = _flat_config(config)
        names = list(params)
        for i in range(0, len(names), 100):  # MLflow takes at most 100 parameters per call
            mlflow.log_params({k: params[k] for k in names[i : i + 100]})

    def log(self, step: int, values: dict) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _WandB:
    def __init__(self, config: Config):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", config.artifact.name), config=config.to_dict())

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


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
