"""The training loss of each data source, for runs that mix several (``data.train`` with more than one source).

What is logged: at every logging step, ``loss/<source>`` = the mean next-token loss of that source's supervised
tokens over the logging window (every micro-batch of every optimizer step since the previous log, on every
process): sum of their negative log-likelihoods / their number. Each token is attributed through the batch's
``source_ids`` (one per token, carried through collation and packing, so a packed row holding documents of several
sources splits correctly), by the source of the token it predicts. Trainer's ``loss`` averages per-step means
instead, so it is a weighted mix of these, not their plain mean.

Cost: one no-grad cross-entropy over the logits the forward already produced, in chunks of ``CHUNK`` tokens (the
float copy stays small), and two ``index_add_`` on tensors that live on the model's device. Nothing is read back
to the host until a logging step; there the (sum, count) pairs are summed over processes with the accelerator
and read once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorafit.data.labels import IGNORE_INDEX

PREFIX = "loss/"
CHUNK = 256  # tokens per cross-entropy call: bounds the float32 copy of the logits (256 x vocabulary, 128 MB at 128k)


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


class SourceLosses:
    """Per-source (summed token loss, token count) since the last log, kept on the device.

    ``observe`` is called with every training micro-batch; ``pop`` at logging steps, on every process at once (it
    reduces across them). ``state_dict`` lets a checkpoint taken between two logs carry the partial sums, so a
    resumed run logs the same values as an uninterrupted one.
    """

    def __init__(self, names: list[str]):
        self.names = list(names)
        self._totals: torch.Tensor | None = None  # (2, S): row 0 summed NLL, row 1 supervised tokens

    def observe(self, logits: torch.Tensor | None, labels: torch.Tensor, source_ids: torch.Tensor) -> None:
        """Add one micro-batch: ``logits`` (B, T, V), ``labels`` and ``source_ids`` (B, T). Fused-loss kernels
        return no logits: then there is nothing to attribute and the batch is not counted."""
        if logits is None:
            return
        with torch.no_grad():
            targets = labels[:, 1:]  # token t is predicted from the logits at t - 1
            # Row by row, chunk by chunk: logits[b, :-1] is a view, so only one chunk is ever copied (to float32).
            length = logits.shape[1] - 1
            nll = torch.cat([
                torch.nn.functional.cross_entropy(logits[b, i : min(i + CHUNK, length)].float(), targets[b, i : i + CHUNK],
                                                  ignore_index=IGNORE_INDEX, reduction="none")
                for b in range(logits.shape[0]) for i in range(0, length, CHUNK)
            ] or [logits.new_zeros(0, dtype=torch.float32)])  # (B * (T - 1),), 0 where ignored
            targets, sources = targets.reshape(-1), source_ids[:, 1:].reshape(-1).to(nll.device)
            totals = self._buffer(nll.device)
            totals[0].index_add_(0, sources, nll.to(totals.dtype))
            totals[1].index_add_(0, sources, (targets != IGNORE_INDEX).to(totals.dtype))

    def _buffer(self, device: torch.device) -> torch.Tensor:
        if self._totals is None:
            # float64 keeps a long window's sum exact enough; MPS has no float64
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._totals = torch.zeros(2, len(self.names), dtype=dtype, device=device)
        elif self._totals.device != device:  # restored from a checkpoint (on the CPU)
            self._totals = self._totals.to(device)
        return self._totals

    def pop(self, accelerator=None) -> dict[str, float]:
        """``{"loss/<name>": mean}`` for every source with supervised tokens in the window; resets the window.

        Call it on every process at the same moment (a collective reduce when there are several)."""
        totals = self._totals if self._totals is not None else torch.zeros(2, len(self.names), dtype=torch.float64)
        if accelerator is not None and accelerator.num_processes > 1:
            totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum")
        nll, counts = totals.tolist()  # the one host read, on logging steps only
        self._totals = None
        return {f"{PREFIX}{name}": s / n for name, s, n in zip(self.names, nll, counts) if n > 0}

    def state_dict(self) -> dict:
        return {"totals": self._totals.detach().cpu() if self._totals is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self._totals = state.get("totals")


def split_source_ids(inputs: dict) -> tuple[dict, torch.Tensor | None]:
    """The model's inputs without ``source_ids`` (a new dict: the caller's batch is left as it was), and those ids."""
    if "source_ids" not in inputs:
        return inputs, None
    return {k: v for k, v in inputs.items() if k != "source_ids"}, inputs["source_ids"]


def source_losses_for(config, objective_active: bool) -> SourceLosses | None:
    """A per-source accumulator when the run mixes several SFT training sources, else None (one source: its loss
    is ``loss``; objectives other than SFT compute a loss that is not a per-token next-token loss)."""
    sources = config.data.train
    if len(sources) < 2 or objective_active:
        return None
    return SourceLosses(source_names([s.path for s in sources]))
