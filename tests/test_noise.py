"""The two known library messages every command printed are filtered exactly, and nothing else is; the Python API
is as quiet as the CLI (model/quiet.py serves both)."""

from __future__ import annotations

import logging
import warnings

from lorafit.model.quiet import silence_known_noise as _silence_known_noise

BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
# bitsandbytes 0.50.2, backends/cpu/ops.py: the format and argument it logs with when `kernels` is absent.
BNB_FORMAT = ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
              "`pip install kernels` and the kernels >= 0.11.1")


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_the_bitsandbytes_kernels_message_is_dropped_and_its_other_warnings_are_not():
    _silence_known_noise()
    _silence_known_noise()  # every command calls it: the filter is added once
    logger, collect = logging.getLogger(BNB_LOGGER), Collect()
    assert len(logger.filters) == 1
    logger.addHandler(collect)
    try:
        logger.warning(BNB_FORMAT, ModuleNotFoundError("No module named 'kernels'"))
        logger.warning("some other bitsandbytes warning")
        logging.getLogger("bitsandbytes").warning(BNB_FORMAT, "on another logger: not ours to hide")
    finally:
        logger.removeHandler(collect)
    assert collect.messages == ["some other bitsandbytes warning"]


def test_only_the_is_gradient_checkpointing_deprecation_is_ignored(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert model.is_gradient_checkpointing is False  # what peft 0.21.2 reads: warns without the filter
        assert [str(w.message)[:35] for w in caught] == ["`is_gradient_checkpointing` is depr"]
        caught.clear()
        _silence_known_noise()
        assert model.is_gradient_checkpointing is False
        warnings.warn_explicit("another deprecation", FutureWarning, "modeling_utils.py", 1,
                               module="transformers.modeling_utils")
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "x.py", 1, module="mylib")
    assert [str(w.message) for w in caught] == ["another deprecation", "`is_gradient_checkpointing` is deprecated"]


def test_the_python_api_is_as_quiet_as_the_cli(tmp_path):
    """`from lorafit import train` in a script: before, it printed transformers' 'Writing model shards' and 'Loading
    weights' bars and peft's FutureWarning, which the CLI hides; now the same quiet (model/quiet.py) serves both."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO, conversation, write_jsonl

    write_jsonl(tmp_path / "t.jsonl", [conversation(f"Say {w}", f"{w} {w}") for w in ("red", "blue")])
    script = (
        "import logging\n"
        "from lorafit import load_config, train\n"
        "result = train(load_config({'data': {'train': [{'path': 't.jsonl'}], 'max_seq_length': 64},\n"
        "    'lora': {'r': 4, 'target_modules': ['q_proj']}, 'eval': {'every': None, 'at_start': False},\n"
        "    'train': {'output_dir': 'run', 'max_steps': 1, 'batch_size': 2}}), progress=False)\n"
        f"filters = logging.getLogger({BNB_LOGGER!r}).filters\n"
        "print('trained', result.metrics['steps'], [f.prefix[:30] for f in filters])\n"
    )
    # A fresh cache: the embedded tiny model is built (and its shards written) inside the script.
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "LORAFIT_CACHE": str(tmp_path / "cache")}
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "trained 1 ['Failed to load CPU gemm_4bit_f']"
    for noise in ("Writing model shards", "Loading weights", "FutureWarning", "is_gradient_checkpointing"):
        assert noise not in done.stderr, done.stderr
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "completed"
