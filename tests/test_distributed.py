"""Several processes: real DDP runs of the tiny model, two processes with the gloo backend, started by
`lorafit train --nproc 2` (torchrun underneath).

2 processes x batch 2 must give the adapter of 1 process x batch 4 (the same global batches, the loss normalised
by the tokens of the whole step); a DDP run SIGKILLed and resumed must end byte-identical to the uninterrupted DDP
run; a checkpoint written by 2 processes must refuse to resume in 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_jsonl
from test_resume import _rows  # the same varied "Repeat: ..." rows the resume tests train on
import kill_resume  # noqa: E402  (on the path test_resume puts scripts/ on)
from safetensors.torch import load_file

from lorafit import load_config, train
from lorafit.cli.launch import Launch, check_launch, launch_command, strip_launch_flags
from lorafit.errors import LorafitError

STEPS = 6
# 2 processes x batch 2 vs 1 x batch 4: the same examples per step, padded to different lengths and summed in
# another order (each process's loss, then the gradient all-reduce). Losses and gradient norms agree to ~1e-7; the
# adapter weights to ~1e-4 after 6 AdamW steps at lr 1e-2 (AdamW divides by sqrt(v) + eps, so where a gradient
# is near zero a rounding difference becomes a step of up to lr). Measured worst: 9.5e-5 of weights up to ~0.08.
TOLERANCE = 5e-4


def _config(folder: Path, model_dir: Path, *, batch_size: int) -> Path:
    # 16 rows / global batch 4 = 4 steps per epoch: 6 steps cross an epoch boundary (the sampler re-draws). A row
    # count that is not a multiple of the global batch would differ on purpose: under DDP accelerate fills the last
    # batch of an epoch with rows from its start (docs/scaling.md).
    # Dropout 0 and no length grouping: with either, the two layouts would draw different examples or masks.
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", _rows(16))
    write_jsonl(folder / "eval.jsonl", _rows(20)[16:])
    config = {
        "model": {"path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": [{"path": "train.jsonl"}], "eval": [{"path": "eval.jsonl"}], "max_seq_length": 256},
        "train": {"output_dir": str(folder / "run"), "max_steps": STEPS, "batch_size": batch_size,
                  "learning_rate": 1e-2, "log_every": 1, "save_every": 2, "keep_last": 3, "seed": 5,
                  "group_by_length": False},
        # eval_loss: the token-weighted mean over the whole eval set (training/evaluation.py), whatever the
        # number of processes: the 4 eval rows give the same value in both layouts.
        "eval": {"every": 3},
    }
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return path


def _launch(config: Path, *extra: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "lorafit", "train", str(config), "--nproc", "2", *extra],
                            cwd=config.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (torchrun starts its workers in sessions of their own, so a
    process-group kill would leave them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-4000:]
    return output


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(next(run.glob("*-v*/final_artifact/adapter_model.safetensors")))


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics_history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model_dir):
    """One uninterrupted 2-process run (batch 2 each) and one 1-process run (batch 4), same seed and data."""
    folder = tmp_path_factory.mktemp("ddp")
    proc = _launch(_config(folder / "two", tiny_model_dir, batch_size=2))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(load_config(_config(folder / "one", tiny_model_dir, batch_size=4)), progress=False)
    finally:
        torch.set_num_threads(before)
    output = _finish(proc)
    return {"folder": folder, "two": folder / "two" / "run", "one": single.run_dir, "output": output}


def test_two_processes_train_the_adapter_of_one_process_with_twice_the_batch(ddp_run):
    report = json.loads((ddp_run["two"] / "data_report.json").read_text())
    assert report["train"]["kept"] == 16  # every row trains: no partial last batch
    two, one = _adapter(ddp_run["two"]), _adapter(ddp_run["one"])
    assert two.keys() == one.keys()
    worst = max((two[k] - one[k]).abs().max().item() for k in two)
    assert worst < TOLERANCE, worst
    assert any((t != 0).any() for k, t in two.items() if "lora_B" in k)  # it trained (lora_B starts at zero)
    # Only the main process printed the summary; both trained.
    assert ddp_run["output"].count("training finished") == 1


def test_metrics_are_reduced_over_both_processes_one_line_per_step(ddp_run):
    two, one = _history(ddp_run["two"]), _history(ddp_run["one"])
    train_two = [r for r in two if "loss" in r]
    assert [r["step"] for r in train_two] == list(range(1, STEPS + 1))  # one line per step, not one per process
    train_one = {r["step"]: r for r in train_one_records(one)}
    for record in train_two:
        reference = train_one[record["step"]]
        assert record["loss"] == pytest.approx(reference["loss"], abs=1e-5)  # mean over processes
        assert record["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)  # of the all-reduced gradient
        # Token counts are sums over the processes: each process sees half of every step's examples.
        assert record["num_input_tokens_seen"] == reference["num_input_tokens_seen"]
        assert record["supervised_tokens_seen"] == reference["supervised_tokens_seen"]
    assert [r["eval_loss"] for r in two if "eval_loss" in r] == pytest.approx(
        [r["eval_loss"] for r in one if "eval_loss" in r], abs=1e-5)


def train_one_records(history: list[dict]) -> list[dict]:
    return [r for r in history if "loss" in r]


def test_checkpoints_hold_every_process_state(ddp_run):
    step = ddp_run["two"] / "checkpoints" / "step-00000004"
    meta = json.loads((step / "checkpoint.json").read_text())
    assert meta["world_size"] == 2 and meta["strategy"] == "ddp"
    tree = json.loads((step / "training_state.json").read_text())
    assert len(tree["ranks"]) == 2  # one RNG state and loss accumulator per process, JSON + safetensors
    tensors = load_file(step / "training_state.safetensors")
    assert {"state.ranks.0.rng.torch_cpu", "state.ranks.1.rng.torch_cpu"} <= tensors.keys()


def test_a_two_process_checkpoint_does_not_resume_in_one_process(ddp_run, tmp_path):
    folder = ddp_run["folder"] / "two"
    config = load_config(folder / "config.json")
    copy = tmp_path / "run"
    shutil.copytree(ddp_run["two"] / "checkpoints", copy / "checkpoints")
    config = config.model_copy(update={"train": config.train.model_copy(update={"output_dir": str(copy)})})
    with pytest.raises(LorafitError) as caught:
        train(config, resume="auto", progress=False)
    message = caught.value.render()
    assert "written by 2 processes, this run has 1" in message and "--nproc 2 --resume auto" in message


@pytest.mark.slow
def test_a_killed_ddp_run_resumes_to_the_uninterrupted_adapter(ddp_run, tiny_model_dir, tmp_path):
    config = _config(tmp_path, tiny_model_dir, batch_size=2)
    # Each file of a checkpoint save waits 0.5 s: after step 2's checkpoint lands, step 4's save is slow enough to
    # be killed in the middle of (the kill then leaves a half-written staging folder as well).
    proc = _launch(config, env_extra=kill_resume.slow_save_env(0.5))
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints / "step-00000002" / "manifest.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    _kill_tree(proc.pid)  # torchrun and both workers at once, as a lost node would
    proc.wait()
    assert not (tmp_path / "run" / "training_summary.json").exists()

    output = _finish(_launch(config, "--resume", "auto"))
    assert "resuming from" in output
    reference, resumed = _adapter(ddp_run["two"]), _adapter(tmp_path / "run")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)  # bit-identical
    losses = {r["step"]: r["loss"] for r in _history(tmp_path / "run") if "loss" in r}
    assert losses == {r["step"]: r["loss"] for r in _history(ddp_run["two"]) if "loss" in r}


# ---------------------------------------------------------------------------------------------- the launcher


def test_nproc_runs_the_same_command_under_torchrun():
    argv = ["train", "c.yaml", "--nproc", "4", "--set", "train.seed=1", "--master-port=1234", "--resume", "auto"]
    command = launch_command(Launch(4), argv)
    assert command[:5] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4"]
    assert "--standalone" in command  # one node: a free rendezvous port, two jobs on a machine do not collide
    assert command[command.index("-m", 3):] == ["-m", "lorafit", "train", "c.yaml", "--set", "train.seed=1",
                                                "--resume", "auto"]
    nodes = launch_command(Launch(8, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29400), argv)
    assert "--standalone" not in nodes
    assert nodes[5:13] == ["--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port", "29400"]
    assert strip_launch_flags(["--nnodes", "2", "--node-rank=1", "x"]) == ["x"]


def test_launcher_mistakes_are_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(LorafitError, match="needs --master-addr"):
        check_launch(Launch(2, nnodes=2))
    with pytest.raises(LorafitError, match="--node-rank 2"):
        check_launch(Launch(2, nnodes=2, node_rank=2, master_addr="h"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LorafitError, match="started already"):
        check_launch(Launch(2))


# ---------------------------------------------------------------------------------------------- strategies


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_strategy_builds_the_zero_config_from_the_lorafit_config(stage):
    from lorafit.config import validate_config
    from lorafit.training.strategy import deepspeed_config

    config = validate_config({"data": {"train": [{"path": str(REPO / "examples/data/quickstart_train.jsonl")}]},
                              "train": {"batch_size": 3, "grad_accum": 2, "max_grad_norm": 0.7},
                              "distributed": {"strategy": f"deepspeed_zero{stage}"}}, base_dir=None, source="test")
    built = deepspeed_config(stage, config)
    zero = built["zero_optimization"]
    assert zero["stage"] == stage
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) is (stage == 3)
    # Batch, accumulation and clipping come from lorafit's own values, so the two can never disagree.
    assert (built["train_micro_batch_size_per_gpu"], built["gradient_accumulation_steps"],
            built["gradient_clipping"]) == (3, 2, 0.7)


def test_fsdp_strategy_asks_for_fsdp2_with_one_unit_per_decoder_layer():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    from lorafit.config import validate_config
    from lorafit.training.strategy import fsdp_plugin

    config = validate_config({"data": {"train": [{"path": str(REPO / "examples/data/quickstart_train.jsonl")}]},
                              "distributed": {"strategy": "fsdp", "fsdp_cpu_offload": True}}, base_dir=None, source="test")
    plugin = fsdp_plugin(config)
    assert isinstance(plugin, FullyShardedDataParallelPlugin) and plugin.fsdp_version == 2
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"  # a unit per _no_split_modules class
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "distributed").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_distributed_example_loads(path):
    config = load_config(path)
    assert config.distributed.strategy in path.stem or path.stem == "fsdp_qlora"


def test_fsdp_that_accelerate_would_drop_is_refused(tmp_path, tiny_model_dir):
    """On a CPU accelerate ignores the FSDP plugin and trains without it (2 CPU processes with strategy fsdp
    trained plain DDP before this check): the run must say so instead of training something else."""
    path = _config(tmp_path, tiny_model_dir, batch_size=2)
    config = load_config(path, ["distributed.strategy=fsdp"])
    with pytest.raises(LorafitError) as caught:
        train(config, progress=False)
    message = caught.value.render()
    assert "distributed.strategy: fsdp is not possible in this run (on a CPU)" in message and "--nproc" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_launcher_mistake_on_the_command_line_exits_1_without_a_traceback(monkeypatch):
    from typer.testing import CliRunner

    from lorafit.cli import app

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["train", str(REPO / "examples/distributed/ddp.yaml"), "--nproc", "2", "--nnodes", "2"]
    monkeypatch.setattr(sys, "argv", ["lorafit", *argv])
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 1 and "--nnodes 2 needs --master-addr" in result.output
    assert "Traceback" not in result.output
