"""The training stage. May use every package except cli.

    recipe.py       one run, top to bottom (``train``)
    run_setup.py    what the recipe assembles: the objective, its data and collator, the loop with its parts
    loop.py         every optimizer step, on accelerate: accumulation, clipping, the guard, log/eval/save
    batches.py      which examples train in which micro-batch on which process, and their loader
    window.py       the values a log line averages, kept on the device between logging steps
    objectives.py   the loss interface (Objective), supervised fine-tuning, the contrastive objective
    preference.py   DPO and ORPO
    source_loss.py  the training loss per data source
    optimizer.py    the optimizer (parameter groups, LoRA+) and the schedule
    guards.py       the non-finite guard
    stopping.py     SIGINT/SIGTERM: checkpoint at the next step, then stop; the stopped-run error
    best_step.py    best step and early stopping
    callbacks.py    the public ``LorafitCallback`` and its events, the metrics history
    snapshot.py     what a checkpoint holds of the loop, and resuming it
    checkpoint.py   crash-safe checkpoints on disk and the resume checks
    strategy.py     processes, reductions, accelerate's strategy plugins (DDP, FSDP2, DeepSpeed), sharded state
    health.py       run health (diverged?)
    results.py      metrics summary, results, data report, report.html
    tracking.py     TensorBoard / MLflow / W&B
    progress.py     what a person watching a run sees
    dry_run.py      ``--dry-run``: one forward and backward on the largest batch
    plugins.py      loading ``pkg.mod:Class`` objectives and callbacks
    memory_record.py the planner's prediction next to the measured peak
    api.py          ``fine_tune``: the run as a function returning the result dictionary
"""
