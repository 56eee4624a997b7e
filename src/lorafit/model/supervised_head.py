"""The language-model head on the supervised positions only (supervised fine-tuning, and the answers of DPO, ORPO,
SimPO and KTO).

A supervised batch has a loss only where the next token is labelled: in chat data the answers, often a third of
the tokens or less (37% in the bundled quickstart data). A causal-LM forward runs its head (hidden x vocabulary)
on every position: the logits of the other positions are computed, kept for the backward and given a gradient of
zeros. At a 128k vocabulary those logits are the largest tensor of a step (4 x 2048 tokens: 2 GiB in bf16, twice
that once accelerate's mixed precision converts them to float32), and the head is 12% of a 3B model's matmuls.

``head_at(model, positions, shape)`` wraps one forward of the model: a forward pre-hook on its output embeddings
(transformers' public ``get_output_embeddings()``) hands the head the hidden states at ``positions`` only, flat
indices into the (B, T) grid, and the model's ``logits`` come back as (N, V), one row per index, in their order.
The loss and its gradient are the same (the positions left out had no loss); tests/test_supervised_head.py
compares them with the whole-grid logits at 1e-6.

``positions`` are made on the host from the CPU labels (``with_positions``, called by the objective in the
loader: training/batches.py's CountingCollator), so choosing them needs no device read, and index_select, unlike
a boolean mask, has a size known without one. ``labelled_logprobs`` is the one forward every objective that scores
labelled tokens makes through it.

A model whose head is not its output-embeddings module called on (B, T, H) hidden states (one that computes its
logits another way) is left alone: the hook sees another shape and changes nothing, the logits come back (B, T, V)
and the caller takes every position, as before.
"""

from __future__ import annotations

import contextlib

import torch

from lorafit.data.labels import IGNORE_INDEX
from lorafit.model.token_logprobs import next_token_logprobs, next_token_targets, token_logprobs, transformers_model

POSITIONS = "supervised_positions"  # the batch key of the flat indices (never a model input)


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """The flat indices into (B, T) of the positions whose next token is labelled: position t predicts label t+1
    (the shift of ``token_logprobs.next_token_targets``). Call it on the CPU labels: ``nonzero`` on a GPU tensor
    waits for the device."""
    return (next_token_targets(labels).reshape(-1) != IGNORE_INDEX).nonzero().squeeze(-1)


@contextlib.contextmanager
def head_at(model, positions: torch.Tensor, shape: torch.Size):
    """Within the block, forwards of ``model`` (a transformers model, or a PeftModel / DDP / FSDP wrapper around
    one) compute their logits at ``positions`` (flat indices into ``shape``, (B, T)) only: (N, V)."""
    head = transformers_model(model).get_output_embeddings()
    if head is None:
        yield
        return
    rows, length = shape[0], shape[1]

    def select(module, args):
        hidden = args[0] if args else None
        if not torch.is_tensor(hidden) or hidden.dim() != 3 or tuple(hidden.shape[:2]) != (rows, length):
            return None  # not the (B, T, H) hidden states of this batch: the head runs as the model calls it
        picked = hidden.reshape(rows * length, hidden.size(-1)).index_select(0, positions.to(hidden.device))
        return (picked, *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def with_positions(batch: dict) -> dict:
    """``batch`` and the positions its labels supervise (``POSITIONS``); a CPU batch (see the module docstring)."""
    if not torch.is_tensor(batch.get("labels")):
        return batch
    return {**batch, POSITIONS: supervised_positions(batch["labels"])}


def labelled_logprobs(model, inputs: dict, labels: torch.Tensor, positions: torch.Tensor | None = None):
    """One forward of ``model`` on ``inputs`` with the head on the labelled positions, and log p of each labelled
    next token (model/token_logprobs.py): (outputs, logps, at). ``at`` the flat positions and ``logps`` (N,) in their
    order; or, for a model the hook cannot reach, ``at`` None and ``logps`` (B, T), 0 where unlabelled.
    ``positions``: ``with_positions``'s, else made here from the labels (one device read: for batches that did not
    come through the loader)."""
    if positions is None:
        positions = supervised_positions(labels.cpu())
    with head_at(model, positions, labels.shape):
        outputs = model(**inputs)
    if outputs.logits.dim() != 2:
        return outputs, next_token_logprobs(outputs.logits, labels)[0], None
    at = positions.to(labels.device)
    return outputs, token_logprobs(outputs.logits, next_token_targets(labels).reshape(-1).index_select(0, at)), at


def on_grid(logps: torch.Tensor, at: torch.Tensor | None, shape) -> torch.Tensor:
    """``labelled_logprobs``'s log-probabilities on the (B, T) grid, 0 where unlabelled."""
    if at is None:
        return logps
    return logps.new_zeros(shape[0] * shape[1]).index_copy(0, at, logps).view(shape[0], shape[1])


def row_sums(logps: torch.Tensor, at: torch.Tensor | None, shape) -> torch.Tensor:
    """Per row (B,): the sum of ``labelled_logprobs``'s log-probabilities. Summed on the (B, T) grid, as a sum over
    the whole-grid logits is: a preference margin is a small difference of two large sums, where float32 rounding
    from another order of addition alone shows (1e-5 of ORPO's log-odds on the tiny model)."""
    return on_grid(logps, at, shape).sum(-1)
