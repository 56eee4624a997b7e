"""``lorafit train --dry-run``: one forward and backward pass on the largest batch the run can draw, then stop.

Everything a run checks before its first optimizer step has run by then (config, data checks and audit, model and
adapter load); this adds the one thing only a real step shows: whether the largest batch fits, and what it costs.
"""

from __future__ import annotations

import time

import torch

from lorafit.config import Config
from lorafit.training.callbacks import peak_memory
from lorafit.training.objectives import Objective


def largest_batch(config: Config, tokenizer, train_data, objective, attn: str = "sdpa") -> dict[str, torch.Tensor]:
    """The ``batch_size`` longest examples, collated as training would: an upper bound on any batch's memory."""
    from lorafit.data.collate import PadCollator
    from lorafit.data.packing import packed_collator
    from lorafit.data.triplets import TripletCollator

    if objective.data == "triplets":
        collate = TripletCollator(tokenizer.pad_token_id)
    elif objective.data in ("preference", "unpaired", "prompts"):
        from lorafit.training.run_setup import collator_for

        collate = collator_for(config, objective, tokenizer, None)
    else:
        collate = (packed_collator(config.data.packing, attn, tokenizer.pad_token_id) if config.data.packing != "none"
                   else PadCollator(tokenizer.pad_token_id))
    order = sorted(range(len(train_data)), key=lambda i: len(train_data[i]["input_ids"]), reverse=True)
    return collate([train_data[i] for i in order[: config.train.batch_size]])


def largest_batch_step(config: Config, model, tokenizer, train_data, objective) -> dict:
    """Forward and backward on the largest batch (no optimizer step: the adapter is unchanged); returns what was
    measured. Gradients are dropped afterwards."""
    from lorafit.model.attention import attention_of
    from lorafit.model.quantization import mixed_precision

    device = next(p for p in model.parameters() if p.requires_grad).device
    if torch.cuda.is_available() and device.type == "cpu" and config.quant.bits is None:
        model.to("cuda")  # where the loop's accelerator would put it
        device = torch.device("cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = {k: v.to(device) if torch.is_tensor(v) else v
             for k, v in largest_batch(config, tokenizer, train_data, objective, attention_of(model)).items()}
    precision = mixed_precision(config)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision or "")
    model.train()
    begun = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        if type(objective).prepare_step is not Objective.prepare_step:  # GRPO samples its answers, KTO pairs rows
            batch = objective.prepare_step(model, [batch], 1)[0]
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss = objective.compute(model, batch)[0]
    loss.backward()
    seconds = time.perf_counter() - begun
    model.zero_grad(set_to_none=True)
    rows, length = batch["input_ids"].shape
    return {
        "batch_rows": int(rows),
        "batch_tokens": int(rows * length),
        "longest_row": int(length),
        "loss": float(loss.detach()),
        "forward_backward_seconds": round(seconds, 3),
        "device": str(device),
        **peak_memory(),
    }
