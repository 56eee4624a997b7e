"""The training loss of each data source, for runs that mix several (``data.train`` with more than one source).

What is logged: at every logging step, ``loss/<source>`` = the mean next-token loss of that source's supervised
tokens over the logging window (every micro-batch of every optimizer step since the previous log, on every
process): sum of their negative log-likelihoods / their number. Each token is attributed through the batch's
``source_ids`` (one per token, carried through collation and packing, so a packed row holding documents of several
sources splits correctly), by the source of the token it predicts. The run's ``loss`` averages per-step means
instead, so it is a weighted mix of these, not their plain mean.

Cost: no second cross-entropy. The supervised objective's token log-probabilities (model/token_logprobs.py, float32
one chunk at a time) are summed per source with two ``index_add_`` on tensors that live on the model's device. The
objective returns the (sum, count) pairs as metrics; the loop's log window keeps them on the device and reads them,
summed over processes, once per logging step (training/window.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lorafit.model.token_logprobs import next_token_logprobs

PREFIX = "loss/"
CHUNK: int | None = None  # positions per float32 chunk in source_sums; None: model/token_logprobs.py's CHUNK_BYTES


def source_names(paths: list[str]) -> list[str]:
    """One short, distinct name per source: its file name, with as many parent folders as it takes to tell equal
    names apart; a file listed twice gets ``_2``, ``_3`` (names stay valid TensorBoard/MLflow/W&B metric names).

    >>> source_names(["data/chat.jsonl", "a/x/t.jsonl", "b/x/t.jsonl", "data/chat.jsonl"])
    ['chat.jsonl', 'a/x/t.jsonl', 'b/x/t.jsonl', 'chat.jsonl_2']
    """
    parts = [Path(p).parts for p in paths]
    names = []
    for own in parts:
        depth = 1
        while depth < len(own) and sum(p[-depth:] == own[-depth:] for p in parts if p != own) > 0:
            depth += 1
        names.append("/".join(own[-depth:]))
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[i] = f"{name}_{seen[name]}"
    return names


def source_sums(logits: torch.Tensor, labels: torch.Tensor, source_ids: torch.Tensor,
                sources: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per source: the summed next-token loss of its supervised tokens and their number, (S,) each, on the
    device. ``logits`` (B, T, V), ``labels`` and ``source_ids`` (B, T); token t+1 is predicted at t and belongs
    to the source of token t+1. (The supervised objective passes the token losses it already has to
    ``sums_by_source`` instead.)"""
    with torch.no_grad():
        logps, mask = next_token_logprobs(logits, labels, chunk_tokens=CHUNK)
    return sums_by_source(-logps, mask, source_ids, sources)


def sums_by_source(token_nll: torch.Tensor, mask: torch.Tensor, source_ids: torch.Tensor,
                   sources: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, token count) per source, (S,) each, from each position's next-token loss ``token_nll`` (B, T),
    0 where ``mask`` (B, T) is False; position t's token belongs to the source of token t+1."""
    with torch.no_grad():
        ids = F.pad(source_ids[:, 1:], (0, 1)).reshape(-1).to(token_nll.device)  # the last position has no target
        dtype = torch.float32 if token_nll.device.type == "mps" else torch.float64  # MPS has no float64
        sums = torch.zeros(sources, dtype=dtype, device=token_nll.device).index_add_(
            0, ids, token_nll.detach().reshape(-1).to(dtype))
        counts = torch.zeros(sources, dtype=dtype, device=token_nll.device).index_add_(
            0, ids, mask.reshape(-1).to(dtype))
    return sums, counts


def split_source_ids(inputs: dict) -> tuple[dict, torch.Tensor | None]:
    """The model's inputs without ``source_ids`` (a new dict: the caller's batch is left as it was), and those ids."""
    if "source_ids" not in inputs:
        return inputs, None
    return {k: v for k, v in inputs.items() if k != "source_ids"}, inputs["source_ids"]


