"""One resolver for `auto` (issue 20): model.dtype, model.attn_implementation and model.kernels are made concrete
by model/resolved.resolve_auto in the run, `lorafit plan` and `lorafit doctor`, so the three report the same."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import conversation, write_jsonl
from typer.testing import CliRunner

from lorafit import load_config
from lorafit.cli import app
from lorafit.errors import LorafitError
from lorafit.model.attention import Machine, attention_of, unavailable_reason
from lorafit.model.kernels import LIGER_MARK
from lorafit.model.loading import load_base_model
from lorafit.model.memory_plan import plan_input, read_shape
from lorafit.model.resolved import Resolved, resolve_auto

CPU = Machine(cuda=False, capability=None)
AMPERE_NO_FLASH = Machine(cuda=True, capability=(8, 0), bf16=True)


def _model(**fields):
    return load_config({"model": fields, "data": {"train": [{"path": "x.jsonl"}]}}).model


def test_auto_on_a_cpu_and_on_a_gpu():
    assert resolve_auto(_model(), "llama", CPU) == Resolved("fp32", "sdpa", "none")
    gpu = resolve_auto(_model(), "llama", AMPERE_NO_FLASH)
    assert gpu.dtype == "bf16"
    # flash-attention 2 is picked on Ampere only when its package is installed; never on a CPU test machine
    from transformers.utils import is_flash_attn_2_available

    assert gpu.attention == ("flash_attention_2" if is_flash_attn_2_available() else "sdpa")
    assert resolve_auto(_model(dtype="fp16"), "llama", CPU).dtype == "fp16"  # an explicit choice is kept


def test_strict_refuses_what_cannot_run_and_plan_takes_it_as_asked():
    asked = _model(attn_implementation="flash_attention_2", kernels="liger")
    with pytest.raises(LorafitError, match="flash_attention_2 cannot be used here"):
        resolve_auto(asked, "llama", CPU)  # the run: refused with the reason
    assert resolve_auto(asked, "llama", CPU, strict=False) == Resolved("fp32", "flash_attention_2", "liger")


def test_the_gpu_a_plan_is_for_when_this_machine_has_none():
    planned = Machine.planned_gpu()
    assert unavailable_reason("flash_attention_2", torch.bfloat16, planned) == (
        "flash_attention_2 depends on the GPU's model, and no GPU is known here")
    assert resolve_auto(_model(), "llama", planned, strict=False).dtype == "bf16"
    assert resolve_auto(_model(), "llama", planned, strict=False).attention == "sdpa"


def test_kernels_follow_the_model_type():
    from lorafit.model.kernels import resolve_kernels

    # a type liger has no kernels for is never fused, on any machine; llama is fused where liger is installed
    assert resolve_auto(_model(), "no-such-type", AMPERE_NO_FLASH).kernels == "none"
    assert resolve_auto(_model(), "llama", AMPERE_NO_FLASH).kernels == resolve_kernels("auto", "llama", cuda=True)


def test_run_plan_and_doctor_report_the_same_choices_here(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", [conversation(f"question {i}?", f"answer {i}") for i in range(8)])
    (tmp_path / "c.yaml").write_text(f"model: {{path: {tiny_model_dir}}}\ndata: {{train: [{{path: train.jsonl}}]}}\n")
    config = load_config(tmp_path / "c.yaml")
    here = Machine.current()

    base = load_base_model(config.model, str(tiny_model_dir))  # the run's loader
    run = Resolved({torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[base.dtype],
                   attention_of(base), getattr(base, LIGER_MARK))

    setup = plan_input(config, read_shape(str(tiny_model_dir)), [40], machine=here).setup
    plan = Resolved(setup.dtype, setup.attention, "liger" if setup.liger else "none")

    done = CliRunner().invoke(app, ["doctor", str(tmp_path / "c.yaml"), "--json"])
    checks = {c["name"]: c for c in json.loads(done.stdout)}
    assert checks["auto resolves to"]["detail"] == run.describe()
    assert run == plan == resolve_auto(config.model, "llama", here)
    if not here.cuda:
        assert run == Resolved("fp32", "sdpa", "none")
