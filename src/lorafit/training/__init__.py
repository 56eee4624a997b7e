"""The training stage. May use every package except cli.

    recipe.py     one run, top to bottom (``train``)
    build.py      the Trainer: TrainingArguments from the config, step counts, callbacks wired in order
    hooks.py      every Trainer hook lorafit overrides, each with its reason, and the start-up check of them
    callbacks.py  the callbacks' explicit order, the metrics history, the public ``LorafitCallback``
    guards.py     what may stop a run: the non-finite guard, SIGINT/SIGTERM, best step and early stopping
    checkpoint.py crash-safe checkpoints and the resume checks
    outcome.py    metrics summary, run health (diverged?), results, report, the stopped-run error
    tracking.py   tracker callbacks and their offline environment
    progress.py   what a person watching a run sees
    dry_run.py    ``--dry-run``: one forward and backward on the largest batch
    api.py        ``fine_tune``: the run as a function returning the result dictionary
"""
