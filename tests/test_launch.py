"""`lorafit train --nproc N` is checked against the machine before anything starts (GPUs, cores, memory per process,
with the numbers), `--nproc 0` exits 1 like every other launcher mistake, and a failed process ends the command in
one clean line with its own exit status instead of torch-elastic's traceback (cli/launch.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, conversation, write_jsonl
from test_cli import invoke

from lorafit.cli.launch import GIB, PROCESS_BYTES, Machine, check_machine, process_bytes
from lorafit.config import load_config
from lorafit.errors import LorafitError


def _config(tmp_path, model_dir, extra: str = "") -> str:
    write_jsonl(tmp_path / "t.jsonl", [conversation(f"Say {w}", f"{w} {w}") for w in ("red", "blue", "green", "black")])
    (tmp_path / "c.yaml").write_text(f"model: {{path: {model_dir}}}\nlora: {{r: 4}}\n"
                                     "data: {train: [{path: t.jsonl}], max_seq_length: 64}\n"
                                     f"train: {{output_dir: out, max_steps: 2, batch_size: 2}}\n{extra}")
    return "c.yaml"


def test_nproc_is_refused_with_the_numbers_when_the_machine_cannot_run_it():
    with pytest.raises(LorafitError) as error:
        check_machine(2, Machine(gpus=1, cores=16, available_bytes=64 * GIB), GIB)
    assert error.value.what == "--nproc 2: this machine has 1 GPU" and "at most 1" in error.value.fix
    with pytest.raises(LorafitError) as error:
        check_machine(64, Machine(gpus=0, cores=2, available_bytes=23 * GIB), GIB)
    assert error.value.what == "--nproc 64: this machine has 2 CPU cores for this process"
    assert error.value.fix == "lower --nproc to at most 2"
    with pytest.raises(LorafitError) as error:
        check_machine(8, Machine(gpus=0, cores=16, available_bytes=5 * GIB), 3 * GIB // 2)
    assert error.value.what == ("--nproc 8: 8 processes x 1.50 GiB = 12.0 GiB, but this machine has 5.0 GiB of memory "
                                "available")
    assert error.value.fix.startswith("lower --nproc to at most 3")
    check_machine(3, Machine(gpus=0, cores=16, available_bytes=5 * GIB), 3 * GIB // 2)  # fits: no error
    check_machine(8, Machine(gpus=8, cores=16, available_bytes=GIB), 3 * GIB // 2)  # GPU memory is the planner's


def test_the_memory_of_one_process_is_the_planners_peak_plus_the_libraries(tmp_path, tiny_model_dir):
    config = load_config(tmp_path / _config(tmp_path, tiny_model_dir))
    needed = process_bytes(config)
    assert PROCESS_BYTES < needed < PROCESS_BYTES + 0.1 * GIB  # the tiny model: ~3.6M parameters in fp32
    bigger = process_bytes(load_config(tmp_path / "c.yaml", ["train.batch_size=64", "data.max_seq_length=1024"]))
    assert bigger > needed  # activations and logits grow with the micro-batch


@pytest.mark.parametrize("nproc, expected", [("0", "--nproc 0: the number of processes must be at least 1"),
                                             ("100000", "--nproc 100000: this machine has ")])
def test_a_bad_nproc_exits_1_with_the_reason_not_a_usage_box(nproc, expected, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    name = _config(tmp_path, tiny_model_dir)
    monkeypatch.setattr(sys, "argv", ["lorafit", "train", name, "--nproc", nproc])
    done = invoke("train", name, "--nproc", nproc, cwd=tmp_path)
    assert done.exit_code == 1 and expected in done.stderr, done.output
    assert "Usage:" not in done.output and not (tmp_path / "out").exists()


def test_a_failed_process_ends_the_launch_in_one_line_with_its_exit_status(tmp_path, tiny_model_dir):
    """Both processes refuse FSDP on a CPU (a check that only runs inside them); before, torchrun ended with a
    ChildFailedError traceback and exit 1 whatever the processes said."""
    name = _config(tmp_path, tiny_model_dir, "distributed: {strategy: fsdp}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "lorafit", "train", name, "--nproc", "2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "distributed.strategy: fsdp is not possible in this run (on a CPU)" in done.stderr
    assert "exited with status 1 (its message is above); the other processes were stopped" in done.stderr
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr[-3000:]
