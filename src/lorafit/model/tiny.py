"""The embedded tiny model: a 4-layer Llama and a byte-level BPE tokenizer with a chat template.

Both are built by this code, from a seed, with no download, so the quickstart and the tests run on a laptop
with nothing but the repository. The model knows nothing of the task until an adapter teaches it, but it is not
all random: its embeddings, head and three attention heads are constructed (model/tiny_weights.py) to give it
what a pretrained model brings to a fine-tune (words it can copy, a sense of position), so a minute of CPU
training makes an adapter that answers held-out rows right.

Widths are multiples of 64 because 4-bit kernels (QLoRA) require it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from lorafit.data.cache import cache_root
from lorafit.data.sample import generate_conversations

# Bump when anything below changes what is written: the cache folder name carries it.
TINY_MODEL_VERSION = 2  # 2: constructed embeddings, head and copy heads (tiny_weights.py)

BOS, EOT, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOT, *ROLE_TOKENS]

# Each turn is `<|role|>\n{content}<|end|>\n`; `<|end|>` ends a turn and is the EOS generation stops at.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

TINY_ARCH = {
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}

# A little general text so the tokenizer is not useless outside the sample task.
_GENERAL_TEXT = """\
The quick brown fox jumps over the lazy dog. A language model predicts the next token from the ones before.
Fine-tuning adapts a pretrained model to a task with a small set of examples; LoRA trains two low-rank
matrices per layer and leaves the base weights frozen. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2026.
Questions? Answers! Lists: one, two, three. {"key": "value", "count": 3, "ok": true, "items": [1, 2]}
"""


def build_tokenizer(seed: int = 0):
    """Train the byte-level BPE tokenizer on the sample task plus some general text (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    train, evaluation = generate_conversations(seed=1234 + seed)
    corpus = [_GENERAL_TEXT] * 4
    for row in train + evaluation:
        corpus.extend(message["content"] for message in row["messages"])

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_ARCH["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=TINY_ARCH["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer, seed: int = 0, *, constructed: bool = True):
    """A LlamaForCausalLM whose special ids match ``tokenizer``: random, then (``constructed``) the parts
    tiny_weights.py builds. ``constructed=False`` is the all-random model the loop's arithmetic tests use."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from lorafit.model.tiny_weights import construct_weights

    config = LlamaConfig(
        **TINY_ARCH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if constructed:
        construct_weights(model, tokenizer)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def write_tiny_model(out_dir: Path, seed: int = 0, *, constructed: bool = True) -> Path:
    """Write model (safetensors) and tokenizer into ``out_dir`` (created; must be empty or absent)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        from lorafit.errors import LorafitError

        raise LorafitError(
            f"{out_dir}: folder is not empty",
            why="init-tiny-model writes a fresh model and will not mix its files with others",
            fix="pass an empty or new folder",
        )
    tokenizer = build_tokenizer(seed)
    model = build_model(tokenizer, seed, constructed=constructed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_model_name(seed: int = 0, *, constructed: bool = True) -> str:
    """The cache folder's name: the version of the constructed weights, or "random" (unchanged since version 1)."""
    return f"tiny-llama-v{TINY_MODEL_VERSION}-seed{seed}" if constructed else f"tiny-llama-random-seed{seed}"


def ensure_tiny_model(seed: int = 0, *, constructed: bool = True) -> Path:
    """Return the cached tiny model folder, building it on first use.

    It is built in a temporary sibling and renamed into place, so an interrupted build never leaves a
    folder that looks complete, and two processes racing here both end with the same files.
    """
    from lorafit.run_folder import publish_folder

    target = cache_root() / tiny_model_name(seed, constructed=constructed)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write_tiny_model(staging / "model", seed, constructed=constructed)
        try:
            publish_folder(staging / "model", target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
