"""report.html's numbers and plots say what was measured: no GPU figure passed off as measured on a CPU run, a memory
plot whose y-axis starts at 0 (a 1 MB change on 2 GB once filled its whole height), and curves that end at the
last step when it is not a multiple of train.log_every (evaluate/report.py, evaluate/report_plots.py)."""

from __future__ import annotations

from conftest import conversation, write_jsonl

from lorafit.evaluate.report import render_html
from lorafit.evaluate.report_plots import figures


def _figure(history, title):
    return dict((t, chart) for t, chart, _ in figures(history, {}))[title]


def test_the_memory_plot_starts_at_zero_so_a_small_change_stays_small():
    history = [{"step": s, "peak_rss_mb": 2000.0 + (s > 2)} for s in (1, 2, 3, 4)]  # +1 MB at step 3
    bottom, top = _figure(history, "Memory").ylim
    assert bottom == 0 and 2001 <= top <= 2001 * 1.1
    assert 1 / (top - bottom) < 0.001  # the change is a thousandth of the height, not all of it


def _card(page: str) -> str:
    return page.split('<div class="label">peak GPU memory</div>', 1)[1].split("</div></div>", 1)[0]


def test_the_peak_gpu_memory_card_shows_a_measurement_or_says_there_was_none():
    gpu = render_html([], {"memory": {"predicted_peak_gib": 10.5, "measured_peak_gib": 10.0, "error_percent": 5.0,
                                      "device": "cuda"}})
    assert '<div class="value">10.00 GiB</div>' in _card(gpu)
    assert "measured (torch.cuda.max_memory_allocated); 10.50 GiB predicted (+5.0%)" in _card(gpu)
    cpu = render_html([], {"memory": {"predicted_peak_gib": 0.02, "measured_peak_gib": None, "device": "cpu"}})
    assert '<div class="value">none: a CPU run</div>' in _card(cpu) and "GiB predicted" not in _card(cpu).split("sub")[0]
    assert "the planner predicted 0.02 GiB for this run on the cpu" in _card(cpu)
    assert "peak GPU memory" not in render_html([], {"memory": {}})


def test_the_curves_end_at_the_last_step_when_it_is_not_a_logging_step(tmp_path, tiny_model_dir):
    from lorafit import load_config, train

    data = write_jsonl(tmp_path / "t.jsonl", [conversation(f"Say {w}", f"{w} {w}") for w in ("red", "blue")])
    result = train(load_config({
        "model": {"path": str(tiny_model_dir)}, "lora": {"r": 4},
        "data": {"train": [{"path": str(data)}], "max_seq_length": 64},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 12, "batch_size": 2, "log_every": 10},
        "eval": {"every": None, "at_start": False}}), progress=False)
    from lorafit.evaluate.report import read_history

    history = read_history(result.run_dir)
    assert [r["step"] for r in history if "learning_rate" in r] == [1, 10, 12]
    for title in ("Loss", "Learning rate", "Gradient norm", "Throughput", "Memory"):
        ends = [line.steps[-1] for line in _figure(history, title).lines]
        assert ends and all(end == 12 for end in ends), (title, ends)


def test_a_chart_draws_its_series_legend_best_step_and_log_axis():
    history = [{"step": s, "loss": 4.0 / s, "eval_loss": 3.0 / s, "grad_norm": 10.0 ** (1 - s)} for s in (1, 2, 3, 4)]
    results = {"best": {"metric": "eval_loss", "step": 4, "value": 0.75}}
    charts = dict((t, chart) for t, chart, _ in figures(history, results))
    loss = charts["Loss"].svg()
    assert loss.count("<polyline") == 2 and "<title>train</title>" in loss and "<title>eval</title>" in loss
    assert ">train</text>" in loss and ">eval</text>" in loss  # the legend names both series
    assert "best 0.75 @ step 4" in loss and 'stroke-dasharray="4 3"' in loss
    norm = charts["Gradient norm"]
    assert norm.log_y and norm.ylim == (0.001, 1.0)  # whole decades around the values 1 down to 0.001
    ticks = [t.split(">")[-1] for t in norm.svg().split("</text>") if 'text-anchor="end"' in t]
    assert ticks == ["0.001", "0.01", "0.1", "1"]
