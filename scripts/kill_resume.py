"""Kill a real `lorafit train` run at random moments (SIGKILL, also during checkpoint saves), resume it each time
with `--resume auto`, and check that the final adapter is byte-identical to an uninterrupted run with the same seed
and that every loss printed after each resume equals the uninterrupted one.

    PYTHONPATH=src python scripts/kill_resume.py --kills 20 --seed 0

The functions here are also used by tests/test_resume.py with a few kills. Result of a long run: docs/resume.md.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEP_LINE = re.compile(r"^step\s+(\d+)/\d+\s+loss (\S+)")
# machine dependent: the only fields allowed to differ
TIMING_KEYS = ("tokens_per_second", "supervised_tokens_per_second", "peak_rss_mb", "gpu_allocated_peak_mb",
               "gpu_reserved_peak_mb", "generation_seconds", "eval_generation_seconds")


SLOW_SAVE = Path(__file__).resolve().parent / "slow_save"  # a sitecustomize that slows checkpoint writes


def slow_save_env(seconds: float) -> dict:
    """Environment for a run whose every checkpoint file write takes ``seconds`` longer (scripts/slow_save), so a
    kill or a signal can land while a checkpoint is half written."""
    return {"LORAFIT_TEST_PAUSE_IN_SAVE": str(seconds),
            "PYTHONPATH": os.pathsep.join([str(SLOW_SAVE), str(REPO / "src")])}


class Launch:
    """One `lorafit train CONFIG --resume auto` process, its output lines collected as they come."""

    def __init__(self, config: Path, cwd: Path, env_extra: dict | None = None):
        import torch

        # Same intra-op thread count as this process (where the reference run trains): float reductions, and so
        # the bytes of the result, may depend on it.
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1",
               "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env_extra or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lorafit", "train", str(config), "--resume", "auto"],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._new: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.errors, False), daemon=True).start()

    def _read(self, stream, sink, notify) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))
            if notify:
                self._new.put(line)

    def steps(self) -> dict[int, str]:
        """Printed losses by step (4 decimals, as the progress line shows them)."""
        return {int(m.group(1)): m.group(2) for line in list(self.lines) if (m := STEP_LINE.match(line))}

    def wait_until(self, predicate, timeout: float = 900.0) -> bool:  # generous: a busy machine is slow, not wrong
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if self.proc.poll() is not None:
                return predicate()
            time.sleep(0.02)
        return False

    def finish(self, timeout: float = 900.0) -> int:
        code = self.proc.wait(timeout)
        time.sleep(0.05)  # let the reader threads drain
        return code


def staging_files(run_dir: Path, pid: int) -> int:
    """Files in the staging folder of a save that process ``pid`` has in progress (0 when none). The pid matters:
    a staging folder left by an earlier kill stays until the next run has started and cleaned it."""
    root = run_dir / "checkpoints"
    counts = []
    for folder in root.glob(f".tmp-step-*-{pid}") if root.is_dir() else []:
        try:
            counts.append(len(list(folder.iterdir())))
        except FileNotFoundError:  # renamed into place meanwhile
            pass
    return max(counts, default=0)


def history(run_dir: Path) -> list[dict]:
    from lorafit.run_folder import RunFolder

    text = (run_dir / RunFolder.HISTORY).read_text(encoding="utf-8")
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in text.splitlines() if line]


def newest_step(run_dir: Path) -> int:
    from lorafit.run_folder import RunFolder
    from lorafit.training.checkpoint import newest_verified

    folder = newest_verified(RunFolder(run_dir).checkpoints)
    return int(folder.name[5:]) if folder else 0


def kill_after_checkpoint(config: Path, run_dir: Path, step: int = 2, timeout: float = 600.0) -> int:
    """Start the run, SIGKILL it once a verified checkpoint of ``step`` or later exists; the newest verified step."""
    launch = Launch(config, run_dir.parent)
    assert launch.wait_until(lambda: newest_step(run_dir) >= step, timeout=timeout)
    launch.proc.send_signal(signal.SIGKILL)
    assert launch.finish() == -signal.SIGKILL
    return newest_step(run_dir)


def kill_and_resume(config: Path, run_dir: Path, reference_losses: dict[int, str], *, kills: int, seed: int,
                    max_steps: int, log=print) -> dict:
    """Kill a run ``kills`` times at random moments, resume each time; returns what happened.

    A kill is one of: SIGKILL a random time after a random training step was printed, or SIGKILL while a checkpoint
    is being written (the save is slowed by LORAFIT_TEST_PAUSE_IN_SAVE so that the moment can be hit; the kill
    lands after a random number of its files). Raises AssertionError on any mismatch.
    """
    rng = random.Random(seed)
    events = []
    for number in range(kills):
        start = newest_step(run_dir)
        during_save = rng.random() < 0.35
        env = slow_save_env(0.15) if during_save else {}
        launch = Launch(config, run_dir.parent, env)
        if during_save:
            files = rng.randint(1, 6)  # a save writes 6 files, then its manifest (training/snapshot.py)
            hit = launch.wait_until(lambda: staging_files(run_dir, launch.proc.pid) >= files)
            what = f"during a save, after {files} file(s)"
        else:
            target = min(start + rng.randint(1, 4), max_steps - 1)
            hit = launch.wait_until(lambda: max(launch.steps(), default=0) >= target)
            time.sleep(rng.uniform(0.0, 0.4))
            what = f"{target} step(s) printed + random delay"
        if launch.proc.poll() is None:
            launch.proc.send_signal(signal.SIGKILL)
        code = launch.finish()
        if during_save:  # confirm: that process's staging folder is still there, half-written
            in_save = any((run_dir / "checkpoints").glob(f".tmp-step-*-{launch.proc.pid}"))
            what += " (confirmed: its staging folder was left behind)" if in_save else " (missed: the save had ended)"
        printed = launch.steps()
        wrong = {s: (v, reference_losses.get(s)) for s, v in printed.items() if reference_losses.get(s) != v}
        assert not wrong, f"kill {number}: losses after resume differ from the uninterrupted run: {wrong}"
        assert code == -signal.SIGKILL or code == 0, f"kill {number}: exit {code}\n" + "\n".join(launch.errors[-20:])
        events.append({"kill": number, "resumed_from": start, "moment": what, "hit": hit, "exit": code,
                       "steps_printed": [min(printed), max(printed)] if printed else [],
                       "newest_checkpoint_after": newest_step(run_dir)})
        log(f"kill {number:>2}: resumed from step {start:>3}, killed {what}; printed steps "
            f"{events[-1]['steps_printed']}, newest verified checkpoint now {events[-1]['newest_checkpoint_after']}")
        if code == 0:  # a kill that missed: the run finished by itself, its last segment checked above
            return {"events": events, "final_steps": printed}
    final = Launch(config, run_dir.parent)
    code = final.finish()
    assert code == 0, "final run failed:\n" + "\n".join(final.errors[-30:])
    wrong = {s: (v, reference_losses.get(s)) for s, v in final.steps().items() if reference_losses.get(s) != v}
    assert not wrong, f"final segment: losses differ: {wrong}"
    return {"events": events, "final_steps": final.steps()}


def _write_config(folder: Path, model_dir: str, max_steps: int) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import conversation, write_jsonl

    rows = []
    for i in range(40):
        words = " ".join(["alpha", "beta", "gamma", "delta"][: 1 + i % 4] * (1 + i % 9))
        rows.append(conversation(f"Repeat: {words}", words))
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "eval.jsonl", rows[:4])
    config = {
        "model": {"path": model_dir},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "data": {"train": [{"path": "train.jsonl"}], "eval": [{"path": "eval.jsonl"}], "max_seq_length": 256},
        "train": {"output_dir": str(folder / "run"), "max_steps": max_steps, "batch_size": 2, "grad_accum": 2,
                  "learning_rate": 5e-3, "log_every": 1, "save_every": 2, "keep_last": 2, "seed": 11},
        "eval": {"every": 5, "at_start": True},
    }
    path = folder / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (oversubscribed cores are ~10x slower)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorafit-kill-resume"))
    args = parser.parse_args()
    import shutil

    from lorafit import load_config, train
    from lorafit.model.tiny import ensure_tiny_model

    import torch

    torch.set_num_threads(args.threads)
    shutil.rmtree(args.workdir, ignore_errors=True)
    (args.workdir / "killed").mkdir(parents=True)
    (args.workdir / "reference").mkdir()
    model_dir = str(ensure_tiny_model())
    started = time.time()
    reference_config = _write_config(args.workdir / "reference", model_dir, args.max_steps)
    reference = train(load_config(reference_config))
    ref_history = history(reference.run_dir)
    ref_losses = {r["step"]: f"{r['loss']:.4f}" for r in ref_history if "loss" in r}
    config = _write_config(args.workdir / "killed", model_dir, args.max_steps)
    result = kill_and_resume(config, args.workdir / "killed" / "run", ref_losses, kills=args.kills, seed=args.seed,
                             max_steps=args.max_steps)
    summary = json.loads((args.workdir / "killed" / "run" / "training_summary.json").read_text())
    same_adapter = (Path(summary["adapter_dir"]) / "adapter_model.safetensors").read_bytes() == (
        reference.adapter_dir / "adapter_model.safetensors").read_bytes()
    same_history = history(args.workdir / "killed" / "run") == ref_history
    kills = len(result["events"])
    during_save = sum("confirmed" in e["moment"] for e in result["events"])
    print(f"\n{kills} kills ({during_save} during a checkpoint save), {args.max_steps} steps, "
          f"{time.time() - started:.0f} s: adapter byte-identical: {same_adapter}; metrics history identical: {same_history}")
    if not (same_adapter and same_history):
        sys.exit(1)


if __name__ == "__main__":
    main()
