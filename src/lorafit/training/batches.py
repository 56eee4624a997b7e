"""Which examples train in which micro-batch, on which process: the batch plan of an epoch, and its loader.

The order of an epoch is a pure function of (seed, epoch) and the data, computed the same way on every process:

    random           a permutation drawn from a generator seeded with seed + epoch
    group_by_length  the same permutation, cut into mega-batches of 50 global batches, each sorted longest first,
                     the mega-batch holding the longest example moved to the front (an out-of-memory shows at once)
    sequential       the order prepare_data made (data.order: curriculum)

The order is then cut into global batches of ``batch_size x processes`` examples; process r takes the r-th slice of
``batch_size`` of each (what accelerate's batch-sampler shard does), so 2 processes x batch 2 see the examples of
1 process x batch 4. Optimizer steps are ``grad_accum`` consecutive micro-batches; the last step of an epoch may
hold fewer (a partial accumulation is still a step). With several processes the order is topped up with its first
examples so that every process has the same number of micro-batches (they take every step together).

Why not a torch Sampler plus accelerate's dataloader wrapper: a resume must land on the exact micro-batch where the
checkpoint was taken, and those wrappers draw their order from global RNG state at iteration time. Here the
position is two integers (epoch, step in epoch) and the remaining batches are a slice of a list, so a resumed run
sees the very batches an uninterrupted one would, by construction, with no RNG replay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MEGA_BATCHES = 50  # global batches per length-sorted group (transformers' LengthGroupedSampler uses the same)


def order_kind(config) -> str:
    """How a run orders each epoch: the config's data.order, packing and train.group_by_length."""
    if config.data.order == "curriculum":
        return "sequential"  # the order prepare_data made is the curriculum
    if config.data.packing != "none" or not config.train.group_by_length:
        return "random"  # a packed row has no padding to save by grouping lengths
    return "group_by_length"


def epoch_order(lengths: list[int], *, seed: int, epoch: int, kind: str, global_batch: int) -> list[int]:
    """Example indices in the order epoch ``epoch`` visits them (identical on every process).

    >>> epoch_order([3, 1, 2], seed=0, epoch=0, kind="sequential", global_batch=2)
    [0, 1, 2]
    """
    n = len(lengths)
    if kind == "sequential":
        return list(range(n))
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    if kind == "random":
        return order
    size = MEGA_BATCHES * global_batch
    megas = [sorted(order[i : i + size], key=lambda index: -lengths[index]) for i in range(0, n, size)]
    longest = max(range(len(megas)), key=lambda m: lengths[megas[m][0]]) if megas else 0
    megas.insert(0, megas.pop(longest))
    return [index for mega in megas for index in mega]


@dataclass(frozen=True)
class BatchPlan:
    """One epoch of one process: ``steps[s]`` is the list of micro-batches (example index lists) of step s."""

    steps: list[list[list[int]]]

    def __len__(self) -> int:
        return len(self.steps)


def epoch_plan(order: list[int], *, batch_size: int, grad_accum: int, processes: int = 1, rank: int = 0,
               repeat: int = 1) -> BatchPlan:
    """Cut an epoch's order into this process's micro-batches, grouped into optimizer steps; ``repeat``: each step's
    micro-batches train that many consecutive steps (GRPO's num_iterations reuses one generation).

    >>> epoch_plan(list(range(7)), batch_size=2, grad_accum=2).steps
    [[[0, 1], [2, 3]], [[4, 5], [6]]]
    >>> epoch_plan(list(range(6)), batch_size=2, grad_accum=1, processes=2, rank=1).steps
    [[[2, 3]], [[0, 1]]]
    >>> epoch_plan(list(range(4)), batch_size=2, grad_accum=1, repeat=2).steps
    [[[0, 1]], [[0, 1]], [[2, 3]], [[2, 3]]]
    """
    global_batch = batch_size * processes
    if processes > 1 and order:
        # Every process must take the same number of micro-batches: top the order up with its first examples.
        short = -len(order) % global_batch
        order = order + (order * math.ceil(short / len(order)))[:short]
    micro = [order[start + rank * batch_size : start + (rank + 1) * batch_size]
             for start in range(0, len(order), global_batch)]
    micro = [batch for batch in micro if batch]
    return BatchPlan([micro[i : i + grad_accum] for i in range(0, len(micro), grad_accum) for _ in range(repeat)])


def steps_per_epoch(num_examples: int, *, batch_size: int, grad_accum: int, processes: int = 1) -> int:
    """Optimizer steps in one pass over ``num_examples`` (at least 1)."""
    micro = math.ceil(num_examples / (batch_size * processes))
    return max(math.ceil(micro / grad_accum), 1)


def eval_plan(num_examples: int, *, batch_size: int, processes: int = 1, rank: int = 0,
              lockstep: bool = False) -> list[tuple[list[int], bool]]:
    """This process's evaluation batches, in order, as (indices, counted). Batch k goes to process k % processes.

    ``lockstep``: every process runs the same number of forwards (sharded models gather weights in each forward, a
    collective); a process short of real batches repeats its first one, not counted.

    >>> eval_plan(5, batch_size=2, processes=2, rank=1, lockstep=True)
    [([2, 3], True), ([2, 3], False)]
    """
    batches = [list(range(i, min(i + batch_size, num_examples))) for i in range(0, num_examples, batch_size)]
    own = [(batch, True) for batch in batches[rank::processes]]
    if lockstep:
        rounds = math.ceil(len(batches) / processes)
        filler = own[0][0] if own else batches[0] if batches else []
        own += [(filler, False)] * (rounds - len(own))
    return own


@dataclass
class Counts:
    """What the host knows about a micro-batch without asking the device: input tokens that are not padding,
    supervised tokens (the loss's denominator) and examples (rows, pairs or triplets)."""

    tokens: int
    supervised: int
    examples: int


class CountingCollator:
    """The objective's collator, plus the micro-batch's ``Counts`` computed on the host from the CPU tensors (in
    the loader's worker when there are workers): no count ever needs a device read."""

    def __init__(self, collate, objective):
        self.collate, self.objective = collate, objective

    def __call__(self, features: list[dict]) -> tuple[dict, Counts]:
        batch = self.objective.host_inputs(self.collate(features))
        if "attention_mask" in batch:
            tokens = int(batch["attention_mask"].sum())
        else:  # packed rows carry no mask: their tokens are the examples' own, the top-up padding excluded
            tokens = sum(len(f["input_ids"]) for f in features)
        return batch, Counts(tokens, int(self.objective.tokens_in(batch)), int(self.objective.examples_in(batch)))


def loader(dataset, micro_batches: list[list[int]], collate, *, workers: int = 0, pin_memory: bool = False):
    """A DataLoader over exactly these micro-batches, in this order. Its own generator: iterating it never draws
    from the global torch RNG (which dropout uses), so where an epoch's loader starts cannot change training."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=micro_batches, collate_fn=collate, num_workers=workers,
                                       pin_memory=pin_memory, generator=torch.Generator().manual_seed(0),
                                       persistent_workers=False)


def to_device(batch: dict, device) -> dict:
    """Every tensor of a CPU batch on ``device`` (asynchronously from pinned memory)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
