"""Crash-safe checkpoints and exact resume, on real training runs of the tiny model.

The kill test runs the real CLI in subprocesses and SIGKILLs it (also in the middle of a checkpoint save); the
full-disk test makes every filesystem operation of a real save fail in turn.
"""

from __future__ import annotations

import errno
import json
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, conversation, write_jsonl
from safetensors.torch import load_file
from lorafit import LorafitCallback, load_config, train
from lorafit.training import checkpoint as ckpt
from lorafit.errors import LorafitError
from lorafit.training.recipe import RunStopped

sys.path.insert(0, str(REPO / "scripts"))
import kill_resume  # noqa: E402  (the harness shared with the long script)

MAX_STEPS = 12


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread here and in the CLI subprocesses (kill_resume.Launch passes it on): the same reduction
    order everywhere, and on a shared 2-core machine ~10x faster than oversubscribed threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        words = " ".join(["alpha", "beta", "gamma", "delta"][: 1 + i % 4] * (1 + i % 7))
        rows.append(conversation(f"Repeat: {words}", words))
    return rows


def _config_dict(folder: Path, model_dir: Path, **train_overrides) -> dict:
    # 12 rows / (batch 2 x accum 2) = 3 steps per epoch: 12 steps cross 3 epoch boundaries (sampler re-draws)
    return {
        "model": {"path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": [{"path": "train.jsonl"}], "eval": [{"path": "eval.jsonl"}], "max_seq_length": 128},
        "train": {"output_dir": str(folder / "run"), "max_steps": MAX_STEPS, "batch_size": 2, "grad_accum": 2,
                  "learning_rate": 1e-2, "log_every": 1, "save_every": 2, "keep_last": 2, "seed": 5,
                  **train_overrides},
        "eval": {"every": 4, "at_start": True},
    }


def _setup(folder: Path, model_dir: Path, **train_overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", _rows(12))
    write_jsonl(folder / "eval.jsonl", _rows(3))
    path = folder / "config.json"
    path.write_text(json.dumps(_config_dict(folder, model_dir, **train_overrides)))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """The uninterrupted run every resumed run must reproduce byte for byte."""
    folder = tmp_path_factory.mktemp("reference")
    result = train(load_config(_setup(folder, tiny_model_dir)))
    hist = kill_resume.history(result.run_dir)
    return {
        "result": result,
        "adapter": (result.adapter_dir / "adapter_model.safetensors").read_bytes(),
        "history": hist,
        "losses": {r["step"]: f"{r['loss']:.4f}" for r in hist if "loss" in r},
    }


def _adapter_bytes(result) -> bytes:
    return (result.adapter_dir / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
def test_sigkill_at_random_moments_and_sigterm_resume_to_the_same_adapter(tmp_path, tiny_model_dir, reference):
    config = _setup(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "run"

    # 1. SIGKILL in the middle of a checkpoint save (3 of its files written, no manifest yet)
    launch = kill_resume.Launch(config, tmp_path, kill_resume.slow_save_env(0.3))
    assert launch.wait_until(lambda: kill_resume.newest_step(run_dir) >= 2 and kill_resume.staging_files(run_dir, launch.proc.pid) >= 3)
    launch.proc.send_signal(signal.SIGKILL)
    assert launch.finish() == -signal.SIGKILL
    half_written = list((run_dir / "checkpoints").glob(".tmp-step-*"))
    assert half_written and not (half_written[0] / ckpt.MANIFEST).exists()
    assert kill_resume.newest_step(run_dir) == 2  # the earlier checkpoint is untouched and verifies

    # 2. SIGTERM: checkpoint at the next step boundary, exit 143, print the command that resumes
    launch = kill_resume.Launch(config, tmp_path)
    assert launch.wait_until(lambda: max(launch.steps(), default=0) >= 3)
    launch.proc.send_signal(signal.SIGTERM)
    assert launch.finish() == 143
    stderr = "\n".join(launch.errors)
    assert "resume with: lorafit train" in stderr and "--resume auto" in stderr
    stopped_at = int(next(line for line in launch.errors if "stopped by SIGTERM at step" in line).split()[-1])
    assert kill_resume.newest_step(run_dir) == stopped_at
    assert not list((run_dir / "checkpoints").glob(".tmp-step-*"))  # the next run cleaned the cut-short save
    assert launch.steps() and all(reference["losses"][s] == v for s, v in launch.steps().items())

    # 3. random SIGKILLs after a random step, then run to the end
    kill_resume.kill_and_resume(config, run_dir, reference["losses"], kills=2, seed=3, max_steps=MAX_STEPS,
                                log=lambda line: None)

    summary = json.loads((run_dir / "training_summary.json").read_text())
    assert (Path(summary["adapter_dir"]) / "adapter_model.safetensors").read_bytes() == reference["adapter"]
    assert kill_resume.history(run_dir) == reference["history"]  # every loss, grad norm, lr and eval loss
    assert summary["resumed_from"] is not None


def test_every_failing_write_of_a_save_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir, reference, monkeypatch):
    """Simulated full disk: the k-th filesystem operation of a save raises ENOSPC, for every k."""
    source = reference["result"].run_dir / "checkpoints"
    steps = [step for step, _ in ckpt.list_checkpoints(source)]
    previous, newest = ckpt.checkpoint_name(steps[-2]), ckpt.checkpoint_name(steps[-1])
    files = {p.name: p.read_bytes() for p in (source / newest).iterdir() if p.name != ckpt.MANIFEST}

    calls = {"n": 0, "fail_at": 0}

    def failing(real):
        def op(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["fail_at"]:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)
        return op

    for name in ("write_durable", "fsync_dir", "write_atomic", "_rename", "_mkdir"):
        monkeypatch.setattr(ckpt, name, failing(getattr(ckpt, name)))

    k = 0
    while True:
        k += 1
        root = tmp_path / f"k{k}"
        shutil.copytree(source, root, ignore=shutil.ignore_patterns(newest))
        calls.update(n=0, fail_at=k)
        try:
            ckpt.commit_checkpoint(root, steps[-1], files, keep_last=1)
        except ckpt.CheckpointWriteError as error:
            message = error.render()
            assert "No space left on device" in message and "disk is full" in message and "--resume auto" in message
            assert ckpt.checkpoint_problems(root / previous) == [] or ckpt.checkpoint_problems(root / newest) == []
            assert not list(root.glob(".tmp-*"))
            resumable = ckpt.newest_verified(root)
            assert resumable is not None and resumable.name in message
            assert resumable.name in (previous, newest)
            continue
        break  # k passed the number of operations of a save: this one succeeded
    assert k > len(files) + 3  # each file, the manifest, the folder fsync, the rename, ... were each made to fail
    assert ckpt.checkpoint_problems(root / newest) == [] and not (root / previous).exists()  # keep_last=1 rotated only now


def test_a_full_disk_during_training_stops_clearly_and_resumes_exactly(tmp_path, tiny_model_dir, reference, monkeypatch):
    config = load_config(_setup(tmp_path, tiny_model_dir))
    real = ckpt.write_durable
    count = {"n": 0}

    def fail_in_third_save(path, data):
        count["n"] += 1
        # saves at steps 2, 3 (epoch end), 4, 6: 7 files + manifest each; fail the third file of step 6's
        if count["n"] == 3 * 8 + 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ckpt, "write_durable", fail_in_third_save)
    with pytest.raises(ckpt.CheckpointWriteError, match="could not write checkpoint step-00000006") as caught:
        train(config)
    assert "step-00000004, is intact" in caught.value.render()
    monkeypatch.setattr(ckpt, "write_durable", real)
    assert not (tmp_path / "run" / "training_summary.json").exists()

    with pytest.raises(LorafitError, match="--resume auto"):
        train(config)  # a fresh start over an unfinished run's checkpoints is refused
    result = train(config, resume="auto")
    assert _adapter_bytes(result) == reference["adapter"]
    assert kill_resume.history(result.run_dir) == reference["history"]


def test_resume_refuses_a_changed_config_or_data_with_a_diff_unless_forced(tmp_path, tiny_model_dir, reference):
    folder = tmp_path / "changed"
    shutil.copytree(reference["result"].run_dir.parent, folder)
    (folder / "run" / "training_summary.json").unlink()
    changed = _config_dict(folder, tiny_model_dir, learning_rate=2e-2)
    write_jsonl(folder / "train.jsonl", _rows(12)[::-1])
    (folder / "config.json").write_text(json.dumps(changed))
    with pytest.raises(LorafitError) as caught:
        train(load_config(folder / "config.json"), resume="auto")
    details = "\n".join(caught.value.details)
    assert "config train.learning_rate: 0.01 -> 0.02" in details
    assert "data train:" in details and "data eval" not in details and "base_model" not in details
    assert "--force-resume" in caught.value.render()

    result = train(load_config(folder / "config.json"), resume="auto", force_resume=True)
    summary = json.loads((result.run_dir / "training_summary.json").read_text())
    assert summary["forced_resumes"][0]["differences"][0] == "config train.learning_rate: 0.01 -> 0.02"


def test_a_folder_without_a_valid_manifest_is_never_resumed(tmp_path, reference):
    root = tmp_path / "checkpoints"
    shutil.copytree(reference["result"].run_dir / "checkpoints", root)
    (older, _), (newest_step, newest) = ckpt.list_checkpoints(root)[-2:]
    blob = bytearray((newest / ckpt.ADAPTER).read_bytes())
    blob[-1] ^= 1  # one flipped bit in the adapter
    (newest / ckpt.ADAPTER).write_bytes(bytes(blob))
    assert ckpt.checkpoint_problems(newest) == [f"{ckpt.ADAPTER}: content does not match its sha256 in the manifest"]
    assert ckpt.newest_verified(root).name == ckpt.checkpoint_name(older)
    with pytest.raises(LorafitError, match="not a complete checkpoint"):
        ckpt.find_resume_point(root, str(newest), overwrite=False)


class PoisonAdapter(LorafitCallback):
    """Test hook: a NaN in one LoRA weight after step 5, as a diverging run would produce."""

    def on_train_begin(self, loop):
        self.model = loop.model

    def on_step_end(self, step, logs):
        if step == 5:
            with torch.no_grad():
                next(p for n, p in self.model.named_parameters() if "lora_A" in n)[0, 0] = float("nan")


def test_a_nan_loss_stops_the_run_keeping_the_last_good_checkpoint(tmp_path, tiny_model_dir):
    config = load_config(_setup(tmp_path, tiny_model_dir, nan_patience=1))
    with pytest.raises(RunStopped, match="non-finite loss and gradient at step 7") as caught:
        train(config, extra_callbacks=[PoisonAdapter()])
    assert caught.value.exit_code == 1
    run = tmp_path / "run"
    assert not (run / "training_summary.json").exists()
    assert caught.value.checkpoint == run / "checkpoints" / "step-00000004"  # step 6 was bad (skipped): not saved
    assert ckpt.newest_verified(run / "checkpoints") == caught.value.checkpoint
    weights = load_file(caught.value.checkpoint / ckpt.ADAPTER)
    assert all(torch.isfinite(t).all() for t in weights.values())


class SendSigint(LorafitCallback):
    """Test hook: Ctrl-C (once or twice) in the middle of step 3, as a user at the terminal would."""

    def __init__(self, times: int):
        self.times = times

    def on_step_begin(self, step, loop):
        if step == 3:
            import os

            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def ctrl_c_as_in_a_terminal():
    """SIGINT as a terminal gives it (Python's default handler). A test process started in the background
    inherits SIGINT ignored, and then Ctrl-C would not interrupt anything there."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_saves_at_the_step_boundary_and_a_second_one_stops_at_once(tmp_path, tiny_model_dir, reference,
                                                                          ctrl_c_as_in_a_terminal):
    config = load_config(_setup(tmp_path / "once", tiny_model_dir))
    with pytest.raises(RunStopped, match="stopped by SIGINT at step 3") as caught:
        train(config, extra_callbacks=[SendSigint(1)])
    assert caught.value.exit_code == 130
    assert caught.value.checkpoint.name == "step-00000003" and ckpt.checkpoint_problems(caught.value.checkpoint) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers are put back
    result = train(config, resume="auto")
    assert _adapter_bytes(result) == reference["adapter"]

    with pytest.raises(KeyboardInterrupt):
        train(load_config(_setup(tmp_path / "twice", tiny_model_dir)), extra_callbacks=[SendSigint(2)])
    assert kill_resume.newest_step(tmp_path / "twice" / "run") == 2  # nothing saved after the interrupt


def test_rotation_keeps_the_newest_and_the_best_and_points_latest_and_best(tmp_path):
    root = tmp_path / "checkpoints"
    for step, eval_loss in ((1, 3.0), (2, 1.0), (3, 2.0), (4, None)):
        files = {name: f"{name} at {step}".encode() for name in ckpt.REQUIRED}
        files[ckpt.META] = json.dumps({"step": step, "best_metric_value": eval_loss}).encode()
        ckpt.commit_checkpoint(root, step, files, keep_last=1, keep_best=1, best_mode="min")
    assert [p.name for _, p in ckpt.list_checkpoints(root)] == ["step-00000002", "step-00000004"]
    assert (root / ckpt.LATEST).read_text().strip() == "step-00000004"
    assert (root / ckpt.BEST).read_text().strip() == "step-00000002"
    assert all(ckpt.checkpoint_problems(p) == [] for _, p in ckpt.list_checkpoints(root))


def test_the_printed_resume_command_keeps_the_users_arguments():
    from lorafit.cli import resume_command

    argv = ["train", "my run.yaml", "--overwrite", "--set", "train.seed=3", "--resume", "runs/x/step-1"]
    assert resume_command(argv) == "lorafit train 'my run.yaml' --set train.seed=3 --resume auto"


class TransientNan(LorafitCallback):
    """Test hook: step 5's forward sees a NaN weight (as from one bad batch); the weight is put back before the
    optimizer step. Records the adapter before and after that step."""

    def __init__(self):
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}
        self._saved = None

    def _lora(self, model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_step_begin(self, step, loop):
        if step == 5:
            self.model = loop.model
            self.before = self._lora(loop.model)
            param = next(p for n, p in loop.model.named_parameters() if "lora_A" in n)
            self._saved = (param, param[0, 0].item())
            with torch.no_grad():
                param[0, 0] = float("nan")

    def on_before_optimizer_step(self, step, loop):
        if self._saved is not None:
            param, value = self._saved
            with torch.no_grad():
                param[0, 0] = value
            self._saved = None

    def on_step_end(self, step, logs):
        if step == 5:
            self.after = self._lora(self.model)


def test_a_bad_step_within_nan_patience_is_skipped_without_touching_the_adapter(tmp_path, tiny_model_dir):
    hook = TransientNan()
    result = train(load_config(_setup(tmp_path, tiny_model_dir, nan_patience=1)), extra_callbacks=[hook])
    assert result.metrics["steps"] == MAX_STEPS
    assert hook.before.keys() == hook.after.keys() and len(hook.before) > 0
    assert all(torch.equal(hook.before[n], hook.after[n]) for n in hook.before)  # step 5 changed nothing
    final = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())


def test_early_stopping_stops_and_its_state_travels_in_the_checkpoint(tmp_path, tiny_model_dir):
    # no evaluation can improve by 100: the second one (step 4; they run at steps 0 and 4) stops the run
    config = load_config(_setup(tmp_path, tiny_model_dir), ["eval.best.patience=1", "eval.best.min_delta=100"])
    result = train(config)
    assert result.best["stopped_early_at"] == 4 and result.metrics["steps"] == 4
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000004" / ckpt.STATE_JSON).read_text())
    assert state["callbacks"]["BestMetric"] == {"best": result.best["value"], "best_step": 0, "stale": 1, "stopped_at": 4}


class StepCounter(LorafitCallback):
    """A user callback with state: it counts the optimizer steps it saw."""

    def __init__(self):
        self.seen = 0

    def on_step_end(self, step, logs):
        self.seen += 1

    def state_dict(self):
        return {"seen": self.seen, "trace": torch.tensor([float(self.seen)])}

    def load_state_dict(self, state):
        assert float(state["trace"][0]) == state["seen"]
        self.seen = state["seen"]


def test_a_user_callbacks_state_travels_in_the_checkpoint(tmp_path, tiny_model_dir):
    config = load_config(_setup(tmp_path, tiny_model_dir), ["train.max_steps=5", "train.keep_last=3"])
    first = StepCounter()
    train(config, callbacks=[first])
    assert first.seen == 5
    # step 5, off the every-2 schedule and mid-epoch, is the run's last: it is saved too, so the run can go on later
    last = json.loads((tmp_path / "run" / "checkpoints" / "step-00000005" / ckpt.META).read_text())
    assert last["position"]["step_in_epoch"] != 0, last["position"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000004" / ckpt.STATE_JSON).read_text())
    assert state["callbacks"]["user"]["0:StepCounter"]["seen"] == 4
    # resumed from step 4 with a fresh instance: it goes on counting from 4, not from 0
    resumed = StepCounter()
    train(config, callbacks=[resumed], overwrite=True, resume=str(tmp_path / "run" / "checkpoints" / "step-00000004"))
    assert resumed.seen == 5
    # a run without the callback cannot take its state silently
    with pytest.raises(LorafitError, match="0:StepCounter"):
        train(config, overwrite=True, resume=str(tmp_path / "run" / "checkpoints" / "step-00000004"))


def test_a_format_1_checkpoint_is_refused_naming_what_to_do(tmp_path, tiny_model_dir, reference):
    """A checkpoint written inside transformers' Trainer (format 1) holds none of the loop's position: refused."""
    config = _setup(tmp_path, tiny_model_dir)
    shutil.copytree(reference["result"].run_dir, tmp_path / "run")
    _, newest = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    meta = json.loads((newest / ckpt.META).read_text())
    data = (json.dumps({**meta, "format": 1}, indent=2) + "\n").encode()
    (newest / ckpt.META).write_bytes(data)
    manifest = json.loads((newest / ckpt.MANIFEST).read_text())  # a complete, verified checkpoint of format 1
    manifest["format"], manifest["files"][ckpt.META] = 1, {"sha256": ckpt.sha256_bytes(data), "bytes": len(data)}
    (newest / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt.checkpoint_problems(newest) == []
    before = (newest / ckpt.ADAPTER).read_bytes()
    with pytest.raises(LorafitError, match="format-1 checkpoint, this lorafit reads format 2") as caught:
        train(load_config(config), overwrite=True, resume="auto")
    assert "start a new run" in caught.value.render()
    assert (newest / ckpt.ADAPTER).read_bytes() == before  # refused before anything was touched


def test_a_sigint_during_a_checkpoint_write_is_acted_on_at_the_next_step(tmp_path, tiny_model_dir, reference,
                                                                        monkeypatch):
    """Ctrl-C while step 2's checkpoint is being written: the save finishes, the signal is kept, the run stops at
    step 3 with a checkpoint there (exit 130), and a resume ends on the uninterrupted adapter."""
    import os

    sent = []

    write = ckpt.write_durable

    def interrupt_once(*args, **kwargs):  # after the first file of a save, before its manifest
        write(*args, **kwargs)
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ckpt, "write_durable", interrupt_once)
    config = load_config(_setup(tmp_path, tiny_model_dir))
    with pytest.raises(RunStopped, match="stopped by SIGINT at step 3") as caught:
        train(config)
    assert sent and caught.value.exit_code == 130
    run = tmp_path / "run" / "checkpoints"
    assert [p.name for _, p in ckpt.list_checkpoints(run)] == ["step-00000002", "step-00000003"]
    assert all(ckpt.checkpoint_problems(p) == [] for _, p in ckpt.list_checkpoints(run))
    monkeypatch.undo()
    result = train(config, resume="auto")
    assert _adapter_bytes(result) == reference["adapter"]
