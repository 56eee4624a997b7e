"""What the libraries print that hides lorafit's own lines, silenced in one place for the CLI and the Python API.

``lorafit.train`` / ``fine_tune`` (lorafit/__init__.py) and every command that loads a model (cli/app.py) call
``quiet_libraries``, so a script sees what a terminal sees: lorafit's lines, and any warning that is not on the
list below. Two kinds of silence:

* known, harmless messages, filtered exactly (logger or module, and the message's start) at their source: any
  other warning of the same library still shows. Delete each filter when its version is gone.
* transformers' and huggingface_hub's progress bars (writing shards, loading weights) and advisory log lines:
  lorafit says what it is doing itself (training/progress.py, evaluate/progress.py).
"""

from __future__ import annotations

import logging
import os
import warnings


class DropMessage(logging.Filter):
    """Drops one logger's records whose message starts with ``prefix``; the logger's other records still show."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# (logger, message start) of log records that are harmless and known.
KNOWN_LOG_NOISE = (
    # bitsandbytes 0.50.2 on a CPU with AVX512-BF16 tries the optional `kernels` package when imported (peft imports
    # it) and logs this when it is absent; it falls back to its own kernel (docs/hardware.md).
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)
# (message regex, category, module regex) of warnings that are harmless and known.
KNOWN_WARNINGS = (
    # transformers 5.23 deprecates is_gradient_checkpointing; peft 0.21.2 reads it in every get_peft_model.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
)


def silence_known_noise() -> None:
    """Install the exact filters above (idempotent; imports nothing, so it can run before the libraries load)."""
    for name, prefix in KNOWN_LOG_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(DropMessage(prefix))
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def quiet_libraries() -> None:
    """The known noise filtered, and transformers' and huggingface_hub's progress bars and advisory lines off;
    never a download (HF_HUB_OFFLINE, unless the caller set it)."""
    silence_known_noise()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
