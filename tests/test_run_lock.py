"""One run at a time in a run folder (run_lock.py): a second `lorafit train` into the folder of a live one is refused
at once, naming the first; a SIGKILLed run leaves no stale lock. Two real processes: the first run is a real
`lorafit train`, held at step 2 by a plugin callback until the test lets it go (or kills it)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, conversation, write_jsonl
from test_cli import invoke

from lorafit.errors import LorafitError
from lorafit.run_folder import RunFolder
from lorafit.run_lock import LOCK_FILE

HOLD = '''
import time
from pathlib import Path

from lorafit.training.callbacks import LorafitCallback


class Hold(LorafitCallback):
    """At step 2 of the first run only: say so, then wait for the test (it kills the process)."""

    def on_step_end(self, step, logs):
        held = Path(__file__).with_name("held")
        if step == 2 and not held.exists():
            held.write_text("")
            for _ in range(6000):
                time.sleep(0.1)
'''


def _steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / RunFolder.HISTORY).read_text().splitlines()]


def test_a_second_run_into_a_live_runs_folder_is_refused_naming_it_and_a_killed_run_leaves_no_lock(tmp_path,
                                                                                                     tiny_model_dir):
    write_jsonl(tmp_path / "t.jsonl", [conversation(f"Say {w}", f"{w} {w}") for w in ("red", "blue", "green")])
    (tmp_path / "hold.py").write_text(HOLD)
    (tmp_path / "c.yaml").write_text(
        f"model: {{path: {tiny_model_dir}}}\nlora: {{r: 4, dropout: 0.0}}\n"
        "data: {train: [{path: t.jsonl}], max_seq_length: 64}\n"
        "train: {output_dir: out, max_steps: 4, batch_size: 3, log_every: 1, save_every: 2}\n"
        "eval: {every: null, at_start: false}\nplugins: {callbacks: ['hold:Hold']}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    first = subprocess.Popen([sys.executable, "-m", "lorafit", "train", "c.yaml"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 900
        while not (tmp_path / "held").exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run never reached step 2"
            time.sleep(0.2)
        run = tmp_path / "out"
        before = (run / RunFolder.HISTORY).read_text()
        assert _steps(run) == [1]  # step 2's line waits for step 3 (training/callbacks.py: MetricsHistory)

        started = time.monotonic()
        second = invoke("train", "c.yaml", cwd=tmp_path)
        assert second.exit_code == 1, second.output
        who = f"another lorafit run is writing into this folder (pid {first.pid} on {socket.gethostname()}, started "
        assert who in second.stderr and "lorafit train c.yaml)" in second.stderr, second.stderr
        assert f"kill {first.pid}" in second.stderr and "train.output_dir=runs/NAME" in second.stderr
        assert time.monotonic() - started < 30  # the CLI's check, before the model and data are loaded
        # The Python API is refused too, by the lock the recipe takes when it claims the folder.
        from lorafit import load_config, train

        with pytest.raises(LorafitError, match=f"pid {first.pid} on "):
            train(load_config(tmp_path / "c.yaml", [f"train.output_dir={run}"]), progress=False)
        assert (run / RunFolder.HISTORY).read_text() == before  # neither wrote a line: no step twice

        first.send_signal(signal.SIGKILL)  # no handler, no cleanup: the kernel drops the lock with the process
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert (run / LOCK_FILE).is_file()  # the killed run's file stays behind, but its lock died with it
    resumed = invoke("train", "c.yaml", "--resume", "auto", cwd=tmp_path)
    assert resumed.exit_code == 0, resumed.output
    assert _steps(run) == [1, 2, 3, 4]
    assert not (run / LOCK_FILE).exists()  # a run that ends gives the folder back and removes the file
