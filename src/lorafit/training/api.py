"""``fine_tune()``: the run as a function that returns the result.json dictionary instead of raising."""

from __future__ import annotations

from pathlib import Path

from lorafit.artifact.result import RESULT_FILE, failed_result, new_job_id
from lorafit.config import Config, load_config
from lorafit.errors import LorafitError
from lorafit.training.recipe import train


def fine_tune(config, overrides: list[str] | None = None, *, overwrite: bool = False) -> dict:
    """Train and return the result dictionary instead of raising; the same dictionary is in result.json.

    ``config`` is a path, a dict or a Config. Bad input gives ``status: failed`` with the error message.
    """
    job_id, validated = new_job_id(), None
    try:
        validated = config if isinstance(config, Config) else load_config(config, overrides or [])
        if isinstance(config, Config) and overrides:
            validated = load_config(config.to_dict(), overrides)
        return train(validated, overwrite=overwrite, progress=False).result
    except (LorafitError, OSError, RuntimeError, ValueError) as error:
        run_dir = Path(validated.train.output_dir).resolve() if validated is not None else None
        written = run_dir / RESULT_FILE if run_dir else None
        if written is not None and written.is_file():  # train() got as far as the run folder and recorded it
            import json

            recorded = json.loads(written.read_text(encoding="utf-8"))
            if recorded.get("status") == "failed":
                return recorded
        return failed_result(job_id, validated, run_dir, error)
