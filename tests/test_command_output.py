"""What a command shows while it runs. Its first line, at once: on stderr, before torch or transformers is imported
(`lorafit eval --baseline` once printed nothing for 631 s). Each command runs as a real process under
``python -X importtime``, whose stderr lists every module as its import finishes, in order with lorafit's own lines;
the process is stopped as soon as the first line has come. Then its stages and counts (evaluate/progress.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from conftest import REPO

COMMANDS = [
    ("train", "c.yaml"), ("config", "validate", "c.yaml"), ("config", "show", "c.yaml"), ("data", "inspect", "c.yaml"),
    ("plan", "c.yaml"), ("doctor",), ("init-tiny-model", "tiny"), ("verify", "nowhere"),
    ("eval", "--adapter", "nowhere", "--data", "e.jsonl", "--baseline"), ("report", "nowhere"),
    ("merge", "nowhere", "--out", "merged"), ("export", "gguf", "nowhere", "--out", "a.gguf"),
    ("generate", "--adapter", "nowhere", "--prompt", "hi"), ("chat", "--adapter", "nowhere"),
]
HEAVY = re.compile(r"\|\s+(torch|transformers|peft|accelerate)(\.|$)")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_every_command_says_what_it_does_before_the_heavy_imports(command, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "lorafit", *command], cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    heavy, first = [], None
    try:
        for line in proc.stderr:
            if line.startswith("lorafit "):
                first = line.strip()
                break
            if HEAVY.search(line):
                heavy.append(line.rsplit("|", 1)[1].strip())
    finally:
        proc.kill()
        proc.wait()
    seconds = time.monotonic() - started
    assert first is not None and first.startswith("lorafit 0.1.0: "), command
    assert heavy == [], f"{first!r} came after importing {heavy[:3]}"
    assert seconds < 10, f"{seconds:.1f} s to the first line (about 0.4 s on an idle machine)"


def test_progress_is_silent_without_a_reporter_and_shows_the_outermost_count_with_one():
    import io

    from lorafit.evaluate.progress import Reporter, reporting, stage, track

    assert list(track(range(3), "loss")) == [0, 1, 2]  # the Python API: nothing to show, nothing shown
    stage("loading")
    log = io.StringIO()
    with reporting(log, interval=3600):
        stage("adapter: loss", subject="adapter")
        for _ in track(range(2), "prompts", unit="answered"):
            assert list(track(range(4), "generation", unit="batches")) == [0, 1, 2, 3]  # inside: not shown
    lines = [line.split("] ", 1)[1] for line in log.getvalue().splitlines()]
    assert lines == ["adapter: loss", "adapter: prompts 0/2 answered", "adapter: prompts 2/2 answered"]

    terminal = io.StringIO()
    reporter = Reporter(terminal, tty=True)
    for done in range(3):
        reporter.count("loss", done, 2, "batches")
    assert terminal.getvalue().count("\r\033[K") == 3 and terminal.getvalue().endswith("loss 2/2 batches\n")
