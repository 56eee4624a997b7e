"""`result.json`: a run's outcome in the shape cloud fine-tuning APIs return, for programs that drive lorafit."""

from __future__ import annotations

import time
import traceback
import uuid
from pathlib import Path

from lorafit.config import Config
from lorafit.errors import LorafitError
from lorafit.run_folder import RunFolder

RESULT_FILE = RunFolder.RESULT


def new_job_id() -> str:
    return f"ftjob-{uuid.uuid4().hex[:24]}"


def _validated_params(config: Config, finetuned_model_id: str | None) -> dict:
    t, lora = config.train, config.lora
    return {
        "finetuned_model_id": finetuned_model_id,
        "model": config.model.path,
        "training_files": [s.path for s in config.data.train],
        "validation_files": [s.path for s in config.data.eval],
        "suffix": f"{config.artifact.name}-v{config.artifact.version}",
        "seed": t.seed,
        "hyperparameters": {
            "n_epochs": t.epochs, "max_steps": t.max_steps, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
            "learning_rate": t.learning_rate, "scheduler": t.scheduler, "warmup_ratio": t.warmup_ratio,
            "warmup_steps": t.warmup_steps, "weight_decay": t.weight_decay,
            "lora_r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "target_modules": lora.target_modules, "use_dora": lora.use_dora, "use_rslora": lora.use_rslora,
            "quant_bits": config.quant.bits,
        },
    }


def completed_result(job_id: str, config: Config, result) -> dict:
    """``status: completed``; or ``failed`` with error type ``TrainingDiverged`` when the run finished every step
    but did not learn (``result.health``): a program that deploys on "completed" must not deploy that adapter.
    The outputs are listed either way, so the diverged run can be examined."""
    adapter = Path(result.adapter_dir)
    health = getattr(result, "health", None) or {"status": "ok"}
    diverged = health["status"] != "ok"
    return {
        "id": job_id,
        "object": "fine_tuning.job",
        "status": "failed" if diverged else "completed",
        "finished_at": int(time.time()),
        "params": {"validated_params": _validated_params(config, str(adapter))},
        "metrics": result.metrics,
        "outputs": {
            "run_dir": str(result.run_dir),
            "artifact_dir": str(adapter),
            "adapter_model": str(adapter / "adapter_model.safetensors"),
            "adapter_config": str(adapter / "adapter_config.json"),
            "metadata": str(adapter / "metadata.json"),
            "checksums": str(adapter / "checksums.json"),
            "metrics_history": str(Path(result.run_dir) / RunFolder.HISTORY),
        },
        "health": health,
        "error": _diverged_error(health) if diverged else None,
    }


def _diverged_error(health: dict) -> dict:
    return {"type": "TrainingDiverged", "message": "training diverged: " + "; ".join(health.get("reasons", [])),
            "user_error": True, "traceback": None}


def failed_result(job_id: str, config: Config | None, run_dir: Path | None, error: BaseException) -> dict:
    """``status: cancelled`` for a run stopped by a signal (it can resume), ``failed`` for anything else."""
    user_error = isinstance(error, LorafitError)
    signalled = isinstance(error, KeyboardInterrupt) or getattr(error, "exit_code", 1) in (130, 143)
    return {
        "id": job_id,
        "object": "fine_tuning.job",
        "status": "cancelled" if signalled else "failed",
        "finished_at": int(time.time()),
        "params": {"validated_params": _validated_params(config, None) if config is not None else {}},
        "metrics": {},
        "outputs": {"run_dir": str(run_dir) if run_dir else None},
        "error": {
            "type": type(error).__name__,
            "message": error.render() if user_error else str(error),
            "user_error": user_error,
            "traceback": None if user_error else "".join(traceback.format_exception(error))[-4000:],
        },
    }
