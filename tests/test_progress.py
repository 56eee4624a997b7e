"""What a person watching a run sees: plain lines off a terminal, a live bar (step, ETA, loss, tokens/s, memory)
on one. Driven through the calls the training loop makes, and by a real short run."""

from __future__ import annotations

import io
import json

from conftest import REPO, write_jsonl
from rich.console import Console

from lorafit.training.progress import Progress

STEP = {"loss": 1.23456, "learning_rate": 2e-4, "grad_norm": 0.5, "tokens_per_second": 9876.4, "peak_rss_mb": 812.3}
EVAL = {"eval_loss": 0.98765, "eval_perplexity": 2.685}


def _drive(progress: Progress, *, main_process: bool = True) -> None:
    """Calls in the order the loop makes them for 4 steps, logging at 2 and 4, evaluating at 4."""
    progress.start(4, 0, main_process=main_process)
    progress.info("trainable parameters: 10 of 100 (10.00%)")
    for step in range(1, 5):
        if step % 2 == 0:
            progress.log(step, dict(STEP))
        if step == 4:
            progress.evaluated(step, dict(EVAL))
        progress.advance(step)
    progress.close()


def test_off_a_terminal_each_log_step_and_evaluation_is_one_plain_line():
    out = io.StringIO()
    progress = Progress(out, console=Console(file=out))
    assert not progress.live
    _drive(progress)
    assert out.getvalue().splitlines() == [
        "trainable parameters: 10 of 100 (10.00%)",
        "step     2/4  loss 1.2346  lr 2.00e-04  grad 0.500  9,876 tok/s",
        "step     4/4  loss 1.2346  lr 2.00e-04  grad 0.500  9,876 tok/s",
        "step     4/4  eval_loss 0.9877 (ppl 2.69)",
    ]
    assert "\x1b" not in out.getvalue()  # no control codes in a log file


def test_on_a_terminal_a_live_bar_shows_step_eta_loss_speed_and_memory():
    out = io.StringIO()
    progress = Progress(console=Console(file=out, force_terminal=True, width=160))
    assert progress.live
    _drive(progress)
    screen = out.getvalue()
    assert "\x1b[" in screen  # drawn with cursor control, not appended lines
    final = screen.rsplit("\r", 1)[-1]
    for expected in ("4/4", "ETA", "loss 1.2346", "9,876 tok/s", "RSS 812 MB"):
        assert expected in screen, expected
    assert "step     2/4  loss" not in screen  # step values live in the bar, not as lines
    assert "step     4/4  eval_loss 0.9877 (ppl 2.69)" in screen  # evaluations and messages print above it
    assert "trainable parameters: 10 of 100" in screen
    assert progress._bar is None and final  # stopped at train end


def test_only_the_main_process_prints():
    out = io.StringIO()
    _drive(Progress(out, console=Console(file=out)), main_process=False)
    _drive(Progress(console=Console(file=out, force_terminal=True)), main_process=False)
    assert out.getvalue().splitlines() == ["trainable parameters: 10 of 100 (10.00%)"] * 2


def test_a_real_run_draws_the_bar_with_its_derived_values(tmp_path, tiny_model_dir):
    from lorafit import load_config, train

    rows = [json.loads(line) for line in (REPO / "examples/data/quickstart_train.jsonl").read_text().splitlines()[:16]]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = io.StringIO()
    progress = Progress(console=Console(file=out, force_terminal=True, width=200))
    train(load_config({
        "model": {"path": str(tiny_model_dir)},
        "data": {"train": [{"path": str(data)}], "eval": [{"path": str(data)}]},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 8, "log_every": 2},
        "eval": {"every": 4, "at_start": False, "generate_samples": 0},
    }), progress=progress)
    screen = out.getvalue()
    assert "4/4" in screen and "tok/s" in screen and "RSS" in screen  # values MetricsHistory derived
    assert "step     4/4  eval_loss" in screen


def test_a_contrastive_evaluation_shows_its_parts_and_no_perplexity_of_the_combined_loss():
    out = io.StringIO()
    progress = Progress(out, console=Console(file=out))
    progress.evaluated(3, {"eval_loss": -1.9933, "eval_causal_stability": 0.91, "eval_spurious_separation": 0.42,
                           "eval_causal_discrimination": 0.77, "eval_task_loss": 2.5, "eval_perplexity": 12.18})
    line = out.getvalue().splitlines()[-1]
    assert line.endswith("eval_causal_stability 0.9100  eval_spurious_separation 0.4200  "
                         "eval_causal_discrimination 0.7700  eval_task_loss 2.5000  (task ppl 12.18)"), line
    assert "eval_loss" not in line
