"""model.attn_implementation: what `auto` picks, clear errors for what cannot run, and packed == one by one for
every implementation this machine can run (GPU-only ones skip without CUDA or their package)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import conversation, write_jsonl

from lorafit import LorafitCallback, load_config, train
from lorafit.config import ModelConfig
from lorafit.data.labels import IGNORE_INDEX, tokenize_conversation
from lorafit.data.packing import PackedCollator
from lorafit.errors import LorafitError
from lorafit.model.attention import Machine, is_packed_row, resolve_attention, unavailable_reason
from lorafit.model.loading import load_base_model

CPU = Machine(cuda=False, capability=None)
HOPPER = Machine(cuda=True, capability=(9, 0))
TURING = Machine(cuda=True, capability=(7, 5))
CUDA = torch.cuda.is_available()
TESTS = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------ choosing


def test_auto_is_sdpa_on_a_cpu_and_never_a_flash_kernel_for_fp32():
    assert resolve_attention("auto", torch.float32, CPU) == "sdpa"
    assert resolve_attention("auto", torch.bfloat16, CPU) == "sdpa"
    assert resolve_attention("auto", torch.float32, HOPPER) == "sdpa"  # flash kernels compute in bf16/fp16 only
    assert resolve_attention("auto", torch.bfloat16, TURING) == "sdpa"  # flash-attention 2 needs Ampere+


@pytest.mark.parametrize("choice, dtype, machine, words", [
    ("flex_attention", torch.float32, CPU, "no backward pass on a CPU"),
    ("flash_attention_2", torch.bfloat16, CPU, "NVIDIA GPUs only"),
    ("flash_attention_3", torch.bfloat16, CPU, "NVIDIA GPUs only"),
    ("flash_attention_2", torch.float32, HOPPER, "bf16 or fp16 only"),
    ("flash_attention_2", torch.bfloat16, TURING, "Ampere or newer"),
    ("flash_attention_3", torch.bfloat16, Machine(cuda=True, capability=(8, 0)), "Hopper GPUs only"),
])
def test_an_explicit_choice_that_cannot_run_here_says_why(choice, dtype, machine, words):
    with pytest.raises(LorafitError) as error:
        resolve_attention(choice, dtype, machine)
    assert f"model.attn_implementation: {choice}" in str(error.value)
    assert words in str(error.value) and "fix:" in str(error.value)


@pytest.mark.parametrize("choice", ["sdpa", "eager"])
def test_sdpa_and_eager_run_everywhere(choice):
    assert unavailable_reason(choice, torch.float32, CPU) is None
    assert resolve_attention(choice, torch.float32, CPU) == choice


@pytest.mark.skipif(CUDA, reason="checks the CPU refusal")
def test_lorafit_refuses_to_train_with_flex_attention_on_a_cpu(tiny_model_dir):
    with pytest.raises(LorafitError, match="flex_attention cannot be used here"):
        load_base_model(ModelConfig(path=str(tiny_model_dir), attn_implementation="flex_attention"), str(tiny_model_dir))


def test_the_config_refuses_an_unknown_implementation():
    with pytest.raises(LorafitError, match="attn_implementation"):
        load_config({"model": {"attn_implementation": "flash_attention"}, "data": {"train": [{"path": "x.jsonl"}]}})


# ------------------------------------------------------------------------------------------ packed == one by one


def _examples(tokenizer) -> list[tuple[list[int], list[int]]]:
    rows = [conversation("Repeat: " + "alpha beta " * (1 + 2 * i), "alpha " * (1 + i)) for i in range(4)]
    out = []
    for i, row in enumerate(rows):
        t = tokenize_conversation(tokenizer, row["messages"], train_on="all" if i % 2 else "all_assistant")
        out.append((t.input_ids, t.labels))
    return out


def _per_example_losses_packed(model, examples) -> list[float]:
    """Mean loss of each example, read out of ONE forward of the packed row that lorafit's collator builds."""
    batch = PackedCollator()([{"input_ids": ids, "labels": labels} for ids, labels in examples])
    assert is_packed_row(batch)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0].float()  # (T, V)
    targets = batch["labels"][0, 1:]
    nll = F.cross_entropy(logits[:-1], targets.clamp(min=0), reduction="none") * targets.ne(IGNORE_INDEX)
    example_of = torch.cumsum(batch["position_ids"][0] == 0, 0)[1:] - 1  # which example each target belongs to
    return [float(nll[example_of == k].sum() / targets[example_of == k].ne(IGNORE_INDEX).sum())
            for k in range(len(examples))]


def _per_example_losses_alone(model, examples) -> list[float]:
    return [float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss) for ids, labels in examples]


def _assert_packed_equals_alone(model, tokenizer, tolerance: float):
    examples = _examples(tokenizer)
    with torch.no_grad():
        packed = _per_example_losses_packed(model, examples)
        alone = _per_example_losses_alone(model, examples)
    assert packed == pytest.approx(alone, rel=tolerance, abs=tolerance)


@pytest.mark.parametrize("choice", ["sdpa", "eager", "auto"])
def test_packed_row_equals_examples_one_by_one_through_lorafit_loading(tiny_model_dir, tiny_tokenizer, choice):
    model = load_base_model(ModelConfig(path=str(tiny_model_dir), attn_implementation=choice), str(tiny_model_dir))
    if not CUDA:
        assert model.config._attn_implementation == ("sdpa" if choice == "auto" else choice)
    assert model.config.use_cache is False
    _assert_packed_equals_alone(model, tiny_tokenizer, 1e-5)


@pytest.mark.slow
def test_flex_attention_keeps_packed_examples_apart_on_a_cpu(tiny_model_dir):
    """Forward only: torch's FlexAttention has no CPU backward (which is why lorafit refuses it for CPU training).
    Compiled, its first forward took ~2 minutes on 2 cores; with TorchDynamo off (a fresh process: the switch is
    read at import) the same block mask runs unfused in seconds."""
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "import test_attention as t\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation='flex_attention', dtype=torch.float32)\n"
        "model.config.use_cache = False\n"
        "assert model.config._attn_implementation == 'flex_attention'\n"
        "t._assert_packed_equals_alone(model, AutoTokenizer.from_pretrained(sys.argv[1]), 1e-5)\n"
        "print('packed == one by one')\n"
    )
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir)], capture_output=True, text=True,
                          env={**os.environ, "TORCHDYNAMO_DISABLE": "1", "PYTHONPATH": path}, timeout=300)
    assert done.returncode == 0 and "packed == one by one" in done.stdout, done.stderr[-3000:]


def test_without_use_cache_false_packed_examples_attend_to_each_other(tiny_model_dir, tiny_tokenizer):
    """The reason for the rule below: with the cache on, the packed losses are wrong (so the test above can fail)."""
    model = load_base_model(ModelConfig(path=str(tiny_model_dir)), str(tiny_model_dir))
    model.config.use_cache = True
    examples = _examples(tiny_tokenizer)
    with torch.no_grad():
        packed, alone = _per_example_losses_packed(model, examples), _per_example_losses_alone(model, examples)
    assert packed[0] == pytest.approx(alone[0], rel=1e-5)  # the first example has nothing before it to see
    assert max(abs(p - a) for p, a in zip(packed[1:], alone[1:])) > 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU (CUDA)")
@pytest.mark.parametrize("choice", ["sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"])
def test_packed_row_equals_examples_one_by_one_on_the_gpu(tiny_model_dir, tiny_tokenizer, choice):
    reason = unavailable_reason(choice, torch.bfloat16, Machine.current())
    if reason:
        pytest.skip(reason)
    model = load_base_model(ModelConfig(path=str(tiny_model_dir), dtype="bf16", attn_implementation=choice),
                            str(tiny_model_dir)).cuda()
    assert model.config._attn_implementation == choice
    examples = _examples(tiny_tokenizer)
    batch = PackedCollator()([{"input_ids": ids, "labels": labels} for ids, labels in examples])
    with torch.no_grad():
        packed = model(**{k: v.cuda() for k, v in batch.items()}).logits[0].float()
        alone = torch.cat([model(input_ids=torch.tensor([ids], device="cuda")).logits[0].float() for ids, _ in examples])
    assert (packed - alone).abs().max() < 0.1  # bf16: same maths, different kernels; a leak measures > 1


# ------------------------------------------------------------------------------------------ the cache rule


class PackedForwards(LorafitCallback):
    """Watches every forward of the inner transformer during a real run: for each packed row (one row, positions
    restarting), was a KV cache built? Records (phase, cache_built) pairs."""

    def __init__(self, turn_cache_on: bool = False):
        self.seen: list[tuple[str, bool]] = []
        self.turn_cache_on = turn_cache_on
        self.phase = "train"

    def on_train_begin(self, loop):
        model = loop.model
        inner = model.get_base_model().model
        inner.register_forward_hook(self._record, with_kwargs=True)
        if self.turn_cache_on:  # what a regression would do; the probe must notice it
            model.get_base_model().config.use_cache = True

    def _record(self, module, args, kwargs, output):
        batch = {"position_ids": kwargs.get("position_ids")}
        if kwargs.get("attention_mask") is not None:
            batch["attention_mask"] = kwargs["attention_mask"]
        if batch["position_ids"] is not None and is_packed_row(batch):
            self.seen.append((self.phase, output.past_key_values is not None))

    def on_step_begin(self, step, loop):
        self.phase = "train"

    def on_evaluate_begin(self, step, loop):
        self.phase = "eval"


def _packed_run(tmp_path, tiny_model_dir, probe: PackedForwards, generate: bool = False):
    rows = [conversation(f"Say {w} twice", f"{w} {w}") for w in "red blue green black white pink gray gold".split()]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    config = load_config({
        "model": {"path": str(tiny_model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": [{"path": str(data)}], "eval": [{"path": str(data)}], "max_seq_length": 64, "packing": "bfd"},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 4, "log_every": 1, "seed": 1},
        # generating (with a cache, per call) between packed evaluations must not leave the cache on
        "eval": {"every": 1, "at_start": False, "generate_samples": 2 if generate else 0,
                 "generate_every": 1 if generate else None, "max_new_tokens": 4},
    })
    return train(config, extra_callbacks=[probe])


def test_no_packed_forward_in_training_or_evaluation_ever_builds_a_kv_cache(tmp_path, tiny_model_dir):
    probe = PackedForwards()
    _packed_run(tmp_path, tiny_model_dir, probe, generate=True)
    phases = {phase for phase, _ in probe.seen}
    assert phases == {"train", "eval"}, probe.seen  # both paths really ran packed rows
    assert not any(cached for _, cached in probe.seen), probe.seen


def test_the_cache_probe_catches_a_model_with_the_cache_on(tmp_path, tiny_model_dir):
    """Proves the test above can fail: turn the cache on after lorafit's own check and the probe sees it."""
    probe = PackedForwards(turn_cache_on=True)
    _packed_run(tmp_path, tiny_model_dir, probe)
    assert probe.seen and all(cached for _, cached in probe.seen)


# ------------------------------------------------------------------------------------------ model.dtype: auto
# (here because the two autos meet: flash kernels are picked only for the bf16 that dtype auto gives a GPU)


def test_dtype_auto_is_the_default_and_resolves_when_the_run_starts():
    from lorafit.config import load_config
    from lorafit.model.loading import resolve_dtype, with_resolved_dtype

    expected = "bf16" if CUDA and torch.cuda.is_bf16_supported() else "fp32"
    assert ModelConfig().dtype == "auto"  # the config layer stays torch-free: it keeps the choice
    assert resolve_dtype("auto") == expected and resolve_dtype("fp16") == "fp16"  # an explicit choice is kept
    config = load_config({"data": {"train": [{"path": "x.jsonl"}]}})
    assert with_resolved_dtype(config).model.dtype == expected and config.model.dtype == "auto"


@pytest.mark.skipif(CUDA, reason="checks the CPU resolution")
def test_dtype_auto_on_a_cpu_loads_fp32_and_picks_sdpa(tiny_model_dir):
    model = load_base_model(ModelConfig(path=str(tiny_model_dir), dtype="auto"), str(tiny_model_dir))
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
