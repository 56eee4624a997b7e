"""Training loss per data source (training/source_loss.py): equal, token by token, to each source's loss computed on
its own (padded, packed, accumulated over micro-batches), summed across processes, and logged by a real run.

The per-source values take the production path: SupervisedObjective.compute returns (sum, count) pairs, the loop's
log window (training/window.py, MetricSums) adds them on the device and reads them at a logging step."""

from __future__ import annotations

import json
import os
import random
import socket
import string
from pathlib import Path

import pytest
import torch
from conftest import conversation, write_jsonl

from lorafit import load_config, train
from lorafit.data import TokenizedDataset
from lorafit.data.collate import PadCollator
from lorafit.data.labels import IGNORE_INDEX, tokenize_conversation, tokenize_text
from lorafit.data.packing import PackedBins, PackedCollator
from lorafit.data.sources import Example
from lorafit.training import source_loss
from lorafit.training.objectives import SupervisedObjective
from lorafit.training.source_loss import source_names, source_sums
from lorafit.training.window import MetricSums


class Window:
    """The loop's log window for the per-source sums, fed as the loop feeds it."""

    def __init__(self, names):
        self.names, self.sums = list(names), MetricSums()

    def observe(self, logits, labels, source_ids) -> None:
        """Synthetic logits straight to the sums (None: a fused loss gave no logits, nothing to attribute)."""
        if logits is None:
            return
        sums, counts = source_sums(logits, labels, source_ids, len(self.names))
        for i, name in enumerate(self.names):
            self.sums.add(f"loss/{name}", sums[i], counts[i])

    def pop(self, reduce=None) -> dict:
        return self.sums.read(reduce)[0]


def _examples(tokenizer) -> list[Example]:
    """Six examples of unequal lengths from two sources (0, 1, 0, 1, ...); some trained on every token."""
    rows = [conversation("Repeat: " + "alpha beta " * (1 + i), "alpha " * (1 + i)) for i in range(5)]
    tokenised = [tokenize_conversation(tokenizer, r["messages"], train_on="all" if i % 2 else "all_assistant")
                 for i, r in enumerate(rows)]
    tokenised.append(tokenize_text(tokenizer, "Lisbon is the capital of Portugal."))
    return [Example(t.input_ids, t.labels, f"row {i}", str(i), source=i % 2) for i, t in enumerate(tokenised)]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False  # packed rows are kept apart only without a cache (data/packing.py)
    return model.eval()


def _reference(model, examples) -> dict[str, float]:
    """Each source's mean token loss, every example run on its own (no padding, no packing, no attribution)."""
    sums, counts = [0.0, 0.0], [0, 0]
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0]  # (T, V)
            targets = torch.tensor(e.labels[1:])
            sums[e.source] += torch.nn.functional.cross_entropy(logits[:-1], targets, ignore_index=IGNORE_INDEX,
                                                                reduction="sum").item()
            counts[e.source] += int((targets != IGNORE_INDEX).sum())
    return {"loss/a": sums[0] / counts[0], "loss/b": sums[1] / counts[1]}


def _observe(model, losses: Window, batch: dict) -> None:
    """One training micro-batch through the supervised objective (what the loop calls), its metrics into the window."""
    model.train()  # the objective attributes losses of training batches only
    try:
        with torch.no_grad():
            _, metrics = SupervisedObjective(losses.names).compute(model, batch)
    finally:
        model.eval()
    losses.sums.add_means(metrics, lambda name: 1.0)


@pytest.mark.parametrize("layout", ["padded", "padding_free", "bfd", "padded_micro_batches"])
def test_each_sources_loss_equals_its_loss_computed_alone(model, tiny_tokenizer, layout, monkeypatch):
    examples = _examples(tiny_tokenizer)
    expected = _reference(model, examples)
    items = TokenizedDataset(examples)
    features = [items[i] for i in range(len(items))]
    if layout == "bfd":
        bins = PackedBins(examples, sum(len(e.input_ids) for e in examples) // 2 + 8)
        features = [bins[i] for i in range(len(bins))]
        assert any(len(set(f["source_ids"])) == 2 for f in features)  # a row holds documents of both sources
        batches = [PackedCollator(source_ids=True)(features)]
    elif layout == "padding_free":
        batches = [PackedCollator(source_ids=True)(features)]
    elif layout == "padded":
        batches = [PadCollator(tiny_tokenizer.pad_token_id, source_ids=True)(features)]
    else:  # gradient accumulation: one logging window over two micro-batches; small chunks for the loss
        monkeypatch.setattr(source_loss, "CHUNK", 7)
        collate = PadCollator(tiny_tokenizer.pad_token_id, source_ids=True)
        batches = [collate(features[:4]), collate(features[4:])]

    losses = Window(["a", "b"])
    for batch in batches:
        _observe(model, losses, batch)
    got = losses.pop()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-5), name
    # the two differ by far more than the tolerance above (an untrained model is near ln(vocab) on everything),
    # so a token attributed to the wrong source would fail the check
    assert abs(got["loss/a"] - got["loss/b"]) > 100 * 1e-5 * got["loss/a"]
    assert losses.pop() == {}  # the window restarts after each log


def test_source_ids_are_per_token_and_padding_is_source_0(tiny_tokenizer):
    examples = _examples(tiny_tokenizer)[:3]
    items = TokenizedDataset(examples)
    padded = PadCollator(tiny_tokenizer.pad_token_id, source_ids=True)([items[i] for i in range(3)])
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        assert padded["source_ids"][row, :n].tolist() == [e.source] * n
        assert padded["source_ids"][row, n:].tolist() == [0] * (padded["input_ids"].shape[1] - n)
    packed = PackedCollator(source_ids=True)([items[i] for i in range(3)])
    assert packed["source_ids"][0].tolist() == [e.source for e in examples for _ in e.input_ids]
    assert "source_ids" not in PadCollator(tiny_tokenizer.pad_token_id)([items[0]])  # only when asked


def test_partial_window_survives_a_checkpoint_and_absent_sources_are_not_logged():
    logits = torch.randn(1, 5, 11)
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX, 7]])
    only_b = torch.ones(1, 5, dtype=torch.long)
    first = Window(["a", "b"])
    first.observe(logits, labels, only_b)
    resumed = Window(["a", "b"])
    resumed.sums.load_state_dict(first.sums.state_dict())
    resumed.observe(logits, labels, only_b)
    first.observe(logits, labels, only_b)
    assert resumed.pop() == pytest.approx(first.pop())
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX).item()
    first.observe(logits, labels, only_b)
    assert first.pop() == pytest.approx({"loss/b": expected})  # source a had no token: no key, not 0 or NaN
    first.observe(None, labels, only_b)  # fused-loss kernels give no logits: nothing to attribute
    assert first.pop() == {}


def test_source_names_are_short_and_distinct():
    assert source_names(["/d/chat.jsonl", "/d/tools.jsonl"]) == ["chat.jsonl", "tools.jsonl"]
    assert source_names(["/a/x/t.jsonl", "/b/x/t.jsonl", "/b/u.csv"]) == ["a/x/t.jsonl", "b/x/t.jsonl", "u.csv"]
    assert source_names(["/d/t.jsonl", "/d/t.jsonl"]) == ["t.jsonl", "t.jsonl_2"]


# ------------------------------------------------------------------------------------------ several processes


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), ACCELERATE_USE_CPU="true")
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(rank)
    losses = Window(["a", "b"])
    logits = torch.randn(2, 6, 9)
    labels = torch.randint(0, 9, (2, 6))
    sources = torch.tensor([[rank] * 6, [1] * 6])  # rank 0 sees source a in row 0; rank 1 only source b
    losses.observe(logits, labels, sources)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")  # (2, 5)
    own = {"a": [float(nll[sources[:, 1:] == 0].sum()), int((sources[:, 1:] == 0).sum())],
           "b": [float(nll[sources[:, 1:] == 1].sum()), int((sources[:, 1:] == 1).sum())]}
    Path(out, f"{rank}.json").write_text(json.dumps({"own": own, "logged": losses.pop(lambda t: accelerator.reduce(t, reduction="sum"))}))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def test_sums_are_reduced_across_processes(tmp_path):
    """Two real processes (gloo, accelerate): each logs the same values, the sums over both processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_main, args=(port, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0]["logged"] == results[1]["logged"]
    for name in ("a", "b"):
        total = sum(r["own"][name][0] for r in results) / sum(r["own"][name][1] for r in results)
        assert results[0]["logged"][f"loss/{name}"] == pytest.approx(total, rel=1e-6)


# ------------------------------------------------------------------------------------------ a real run


def _run_config(tmp_path, model_dir, sources: list[Path], *, packing="bfd", out="run", **train_section):
    return load_config({
        "model": {"path": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": [{"path": str(p)} for p in sources], "max_seq_length": 128, "packing": packing},
        "train": {"output_dir": str(tmp_path / out), "batch_size": 2, "grad_accum": 2, "learning_rate": 5e-2,
                  "log_every": 1, "seed": 5, **train_section},
        "eval": {"every": None, "at_start": False, "generate_samples": 0},
    })


def test_a_run_logs_each_sources_loss_easy_below_random(tmp_path, tiny_model_dir):
    """One constant text (learned fast) and random words (not learnable) mixed, packed, with accumulation."""
    rng = random.Random(0)
    easy = write_jsonl(tmp_path / "easy.jsonl", [{"text": "the cat sat on the mat and the dog sat on the log"}] * 24)
    noisy = write_jsonl(tmp_path / "noisy.jsonl", [
        {"text": "".join(rng.choices(string.ascii_letters + string.digits + " ", k=40))} for _ in range(24)])
    result = train(_run_config(tmp_path, tiny_model_dir, [easy, noisy], max_steps=8), progress=False)
    history = [json.loads(line) for line in (result.run_dir / "metrics_history.jsonl").read_text().splitlines()]
    steps = [r for r in history if "loss" in r]
    names = ("loss/easy.jsonl", "loss/noisy.jsonl")
    both = [r for r in steps if set(names) <= set(r)]
    assert len(steps) == 8 and len(both) >= 6
    first, last = both[0], both[-1]
    assert last["loss/easy.jsonl"] < first["loss/easy.jsonl"] - 0.5  # the constant text is being learned
    assert last["loss/easy.jsonl"] < last["loss/noisy.jsonl"] - 0.5  # ... random characters cannot be
    for r in steps:  # one step per log: the run's loss is a token-weighted mix of the sources in the step
        present = [r[k] for k in names if k in r]
        assert present, r
        if len(present) == 1:  # a step that drew one source only (the epoch's last, partial one): its loss exactly
            assert r["loss"] == pytest.approx(present[0], rel=1e-5)
        assert min(present) - 1e-4 <= r["loss"] <= max(present) + 1e-4, r
    summary = json.loads((result.run_dir / "training_summary.json").read_text())
    assert summary["metrics"]["series"]["loss/easy.jsonl"]["final"] == last["loss/easy.jsonl"]
    assert '</svg><figcaption>Training loss per source</figcaption>' in (result.run_dir / "report.html").read_text()


def test_one_source_logs_no_per_source_loss(tmp_path, tiny_model_dir):
    only = write_jsonl(tmp_path / "only.jsonl", [{"text": f"line {i} of the only source"} for i in range(8)])
    result = train(_run_config(tmp_path, tiny_model_dir, [only], max_steps=1), progress=False)
    history = [json.loads(line) for line in (result.run_dir / "metrics_history.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in history)
    assert not any(k.startswith("loss/") for r in history for k in r)


def test_a_resumed_run_logs_the_same_per_source_losses(tmp_path, tiny_model_dir):
    """A checkpoint taken inside a logging window (step 3 of 4) carries the partial sums: after a Ctrl-C and a
    resume, the values logged at step 4 are the uninterrupted run's."""
    from test_resume import SendSigint

    from lorafit.training.stopping import RunStopped

    rows = [conversation(f"Say {w}", f"{w} {w}") for w in "red blue green black white pink gray gold".split()]
    sources = [write_jsonl(tmp_path / "colors.jsonl", rows),
               write_jsonl(tmp_path / "texts.jsonl", [{"text": f"text number {i} of the second source"} for i in range(8)])]

    def config(out: str):
        return _run_config(tmp_path, tiny_model_dir, sources, packing="none", out=out, max_steps=4, log_every=4,
                           save_every=2)

    reference = train(config("reference"), progress=False)
    with pytest.raises(RunStopped, match="at step 3"):
        train(config("resumed"), progress=False, callbacks=[SendSigint(1)])
    resumed = train(config("resumed"), progress=False, resume="auto")

    def logged(result) -> dict:
        history = [json.loads(line) for line in (result.run_dir / "metrics_history.jsonl").read_text().splitlines()]
        return next(r for r in history if r["step"] == 4)

    want, got = logged(reference), logged(resumed)
    assert {"loss/colors.jsonl", "loss/texts.jsonl"} <= set(want)
    for key in ("loss", "loss/colors.jsonl", "loss/texts.jsonl"):
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
