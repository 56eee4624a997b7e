"""lorafit's loop against a plain PEFT + torch.optim.AdamW loop written here: same batches, schedule and clipping.

If accumulation, loss normalisation, clipping, the scheduler or the optimizer's groups drift from the textbook step,
the LoRA tensors differ after three steps."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from conftest import conversation, write_jsonl
from lorafit import LorafitCallback, load_config, train

LR, MAX_NORM, WEIGHT_DECAY, STEPS, BATCH, ACCUM = 2e-3, 0.05, 0.01, 3, 2, 2


class Capture(LorafitCallback):
    """The prepared training rows, the LoRA config and the adapter as the loop starts; the adapter after each step."""

    def on_train_begin(self, loop):
        self.rows = [loop.train_data[i] for i in range(len(loop.train_data))]
        self.peft_config = copy.deepcopy(loop.model.peft_config["default"])
        self.initial = lora_tensors(loop.model)
        self.model = loop.model

    def on_train_end(self, step, loop):
        self.final = lora_tensors(loop.model)


def lora_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rows() -> list[dict]:
    # Unequal lengths, so padding and the token-count normalisation both matter.
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return [conversation(f"Repeat {' '.join(words[: 1 + i % 5])}", " ".join(words[i % 7 : i % 7 + 1 + i % 4]))
            for i in range(BATCH * ACCUM * STEPS)]


def _collate(rows: list[dict], pad_id: int) -> dict:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _plain_loop(model_dir, captured: Capture, pad_id: int) -> tuple[dict, list[float]]:
    """The reference: a textbook accumulation loop, nothing from lorafit."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base.config.use_cache = False
    model = get_peft_model(base, copy.deepcopy(captured.peft_config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(captured.initial[name])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    cosine = lambda s: 0.5 * (1.0 + math.cos(math.pi * s / STEPS))  # noqa: E731 (transformers' cosine, no warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    norms = []
    rows = captured.rows  # data.order: curriculum keeps the prepared order: step s takes rows [4s, 4s + 4)
    for step in range(STEPS):
        micro = [rows[step * BATCH * ACCUM + m * BATCH: step * BATCH * ACCUM + (m + 1) * BATCH] for m in range(ACCUM)]
        batches = [_collate(m, pad_id) for m in micro]
        total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum") / total
            loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, MAX_NORM)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return lora_tensors(model), norms


def test_three_steps_equal_a_plain_peft_adamw_loop(tmp_path, tiny_model_dir, tiny_tokenizer):
    data = write_jsonl(tmp_path / "train.jsonl", _rows())
    captured = Capture()
    train(load_config({
        "model": {"path": str(tiny_model_dir), "dtype": "fp32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": [{"path": str(data)}], "max_seq_length": 64, "order": "curriculum"},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": STEPS, "batch_size": BATCH, "grad_accum": ACCUM,
                  "learning_rate": LR, "scheduler": "cosine", "warmup_steps": 0, "max_grad_norm": MAX_NORM,
                  "weight_decay": WEIGHT_DECAY, "log_every": 100, "save_every": None, "seed": 3},
        "eval": {"every": None, "at_start": False},
    }), progress=False, callbacks=[captured])

    assert len(captured.rows) == BATCH * ACCUM * STEPS
    expected, norms = _plain_loop(tiny_model_dir, captured, tiny_tokenizer.pad_token_id)
    assert max(norms) > MAX_NORM, f"clipping never engaged (norms {norms}): the test would not check it"
    assert expected.keys() == captured.final.keys()
    moved = max(float((captured.final[n] - captured.initial[n]).abs().max()) for n in expected)
    assert moved > 1e-4, "the adapter did not move: nothing was compared"
    for name, tensor in expected.items():
        torch.testing.assert_close(captured.final[name], tensor, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
