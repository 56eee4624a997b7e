"""The two known library messages every command printed are filtered exactly, and nothing else is."""

from __future__ import annotations

import logging
import warnings

from lorafit.cli.app import _silence_known_noise

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
