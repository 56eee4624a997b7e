"""lorafit: LoRA fine-tuning of causal language models from one config file.

    from lorafit import load_config, train
    result = train(load_config("examples/quickstart.yaml"))
    print(result.adapter_dir, result.metrics["eval_loss_final"])
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_config", "train", "fine_tune", "Config", "LorafitError", "TrainResult", "LorafitCallback",
           "Progress"]


def __getattr__(name: str):
    # Lazy: `lorafit --help` and config checks should not pay for importing torch and transformers.
    if name in ("load_config", "Config"):
        from lorafit import config

        return getattr(config, name)
    if name in ("train", "TrainResult", "fine_tune"):
        # A script sees what the CLI shows: the same library messages and progress bars silenced (model/quiet.py),
        # before the training modules import peft (and through it bitsandbytes).
        from lorafit.model.quiet import quiet_libraries

        quiet_libraries()
    if name in ("train", "TrainResult"):
        from lorafit.training import recipe

        return getattr(recipe, name)
    if name == "LorafitCallback":
        from lorafit.training.callbacks import LorafitCallback

        return LorafitCallback
    if name == "Progress":
        from lorafit.training.progress import Progress

        return Progress
    if name == "fine_tune":
        from lorafit.training.api import fine_tune

        return fine_tune
    if name == "LorafitError":
        from lorafit.errors import LorafitError

        return LorafitError
    raise AttributeError(f"module 'lorafit' has no attribute {name!r}")
