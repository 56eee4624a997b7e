"""Several processes, one run: who is who, where they wait for each other, what they reduce, the accelerate
plugins of each strategy, and the state that is sharded or per process (docs/scaling.md).

A launcher (torchrun, or ``lorafit train --nproc N``, which re-runs the command under torchrun) starts every
process with RANK/WORLD_SIZE/LOCAL_RANK set; each runs the same recipe. accelerate does the distributed training
itself (DDP, FSDP2, DeepSpeed ZeRO: ``make_accelerator``); lorafit adds only

    init_processes     the process group, before the data is read (the main process tokenises and caches first)
    barrier            the others wait while the main process writes run files, checkpoints and the artifact
    sum_on_host        host integers summed over processes (step token counts, stop requests) on the CPU group
    gather_objects     each process's RNG state and loss window, for the checkpoint the main process writes
    adapter_state,     the full adapter and optimizer state on the CPU for a checkpoint (FSDP2 through
    optimizer_state    torch.distributed.checkpoint.state_dict), and their inverse on resume
    require_same_world_size   a checkpoint resumes only with the world size that wrote it

With one process every function here is a no-op, and no process group is created.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from lorafit.config import Config
from lorafit.errors import LorafitError
from lorafit.processes import launcher_rank


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return launcher_rank()


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


def init_processes(config: Config) -> None:
    """Join the launcher's process group now (Trainer would only do it when the Trainer is built), so the
    processes can wait for each other while the data is read. accelerate finds the group and uses it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return
    from datetime import timedelta

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # gloo beside nccl: the small Python objects gathered for checkpoints travel on the CPU.
        backend = "cuda:nccl,cpu:gloo"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend=backend, timeout=timedelta(minutes=config.distributed.timeout_minutes))


def barrier() -> None:
    if _active():
        torch.distributed.barrier()


@contextmanager
def main_process_first():
    """The main process runs the block first (it fills the data cache); the others run it after, reading the
    cache it wrote instead of tokenising the same files again."""
    main = rank() == 0
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()


def gather_objects(value) -> list:
    """Every process's ``value``, in rank order (a one-element list with one process)."""
    if not _active():
        return [value]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def broadcast_from_main(value):
    """The main process's ``value`` on every process (``value`` itself with one process)."""
    if not _active():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def sum_on_host(values: list, dtype: torch.dtype = torch.int64) -> list:
    """Sum of each number (integers, or floats with ``dtype`` float64) over every process (``values`` itself with
    one process). Runs on the CPU group (gloo beside nccl, ``init_processes``): a host-side collective that never
    waits for a GPU."""
    if not _active():
        return list(values)
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"  # a pure nccl group, made by another
    total = torch.tensor(values, dtype=dtype, device=device)
    torch.distributed.all_reduce(total)
    return total.tolist()


def make_accelerator(config: Config):
    """The accelerate ``Accelerator`` of a run: device, mixed precision, and the strategy's plugin.

    Gradient accumulation is lorafit's (training/loop.py): the accelerator's own count stays 1 (its ``backward``
    would otherwise divide every loss again) and the loop says which micro-batch ends a step (``sync_gradients``)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from lorafit.model.quantization import mixed_precision

    check_strategy_can_run(config)
    _forget_previous_accelerator()
    d = config.distributed
    plugins = {}
    if d.strategy == "fsdp":
        plugins["fsdp_plugin"] = fsdp_plugin(config)
    elif d.strategy.startswith("deepspeed_zero"):
        from accelerate.utils import DeepSpeedPlugin

        plugins["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(int(d.strategy[-1]), config))
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(config) or "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)], **plugins)
    require_strategy_active(config, accelerator)
    return accelerator


def _forget_previous_accelerator() -> None:
    """accelerate keeps one accelerator state per Python process: a second run in the same process (the Python API,
    a notebook, the tests) with another precision or strategy would be refused ("AcceleratorState has already been
    initialized"). Forget it, as transformers' TrainingArguments does before each Trainer; the process group
    (PartialState) is kept. accelerate has no public reset (checked on accelerate 1.15): if ``_reset_state`` goes,
    this fails loudly at the first run, in the tests."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def fsdp_plugin(config: Config):
    """FSDP2, one shard unit per decoder layer (the model's ``_no_split_modules``), full state dicts on save."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        cpu_offload=config.distributed.fsdp_cpu_offload, state_dict_type="FULL_STATE_DICT",
        # the main process reads the weights, the others get them from it: one copy in CPU memory, not N
        cpu_ram_efficient_loading=False)


def deepspeed_config(stage: int, config: Config) -> dict:
    """The DeepSpeed config of ``distributed.strategy: deepspeed_zero{2,3}``, filled from the lorafit config (so the
    two cannot disagree). DeepSpeed clips (``train.max_grad_norm``) and steps inside accelerate's backward; the loop
    tells it which micro-batch ends a step, and its loss is already normalised (``scale_wrt_gas=False``)."""
    from lorafit.model.quantization import mixed_precision

    t = config.train
    precision = mixed_precision(config)
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if stage == 3:
        # peft's adapter weights are gathered for saving; 16-bit weights on save keeps the artifact loadable.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "train_micro_batch_size_per_gpu": t.batch_size,
        "train_batch_size": t.batch_size * t.grad_accum * world_size(),
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm or 0.0,
    }


def require_same_world_size(folder: Path, saved: int) -> None:
    """Refuse to resume a checkpoint written by another number of processes.

    Resharding would be possible for DDP (every process holds the same adapter and optimizer state), but the
    data position is not: each process's place in its shard, its RNG state and its loss accumulator belong to a
    split of the data that another world size does not have. A resume that is not exact is not offered."""
    current = world_size()
    if saved != current:
        raise LorafitError(
            f"cannot resume from {folder}: it was written by {saved} process{'es' * (saved != 1)}, this run has "
            f"{current}",
            why="each process's data shard, RNG state and loss accumulator are saved per process; another world "
            "size splits the data differently, so the resumed run would not continue the same run",
            fix=f"resume with the same number of processes (lorafit train CONFIG --nproc {saved} --resume auto), or "
            "start a new run (another train.output_dir, or --overwrite)",
        )


# ---------------------------------------------------------------------------------------------- checkpoints
# A checkpoint is written by the main process, but some of what it holds lives on every process: the adapter and
# optimizer shards under FSDP2/ZeRO-3, and each process's RNG and loss window under any strategy.


def strategy_of(accelerator) -> str:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if accelerator.num_processes > 1 else "single"


def adapter_state(model, accelerator) -> dict[str, torch.Tensor]:
    """The full adapter on the CPU; call it on every process (it gathers). Under FSDP2 each parameter is a DTensor
    shard: ``full_tensor`` gathers only the adapter's (same order on every process); under ZeRO-3 DeepSpeed gathers
    the trainable parameters (only those, not the base)."""
    from peft import get_peft_model_state_dict

    model = accelerator.unwrap_model(model)
    if strategy_of(accelerator) == "deepspeed" and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad]):
            return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
            for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model, accelerator, weights: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's adapter back, before the first resumed step. Under FSDP2 each process keeps its shard of
    the full tensors (``set_model_state_dict``, which takes module names); otherwise peft loads them directly."""
    inner = accelerator.unwrap_model(model)
    if strategy_of(accelerator) == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(inner, by_module_name(inner, weights),
                             options=StateDictOptions(full_state_dict=True, strict=False))
        return
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(inner, weights)
    if result.unexpected_keys:
        raise RuntimeError(f"checkpoint adapter has tensors the model lacks: {result.unexpected_keys[:5]}")


def by_module_name(model, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft adapter tensors (names without the adapter name, as saved) keyed by the model's own state-dict names.
    peft's ``get_peft_model_state_dict`` picks and renames entries of the state dict it is given, so the same
    tensor objects tell which module name each saved name stands for."""
    from peft import get_peft_model_state_dict

    state = model.state_dict()
    name_of = {id(tensor): name for name, tensor in state.items()}
    return {name_of[id(tensor)]: weights[saved]
            for saved, tensor in get_peft_model_state_dict(model, state_dict=state).items() if saved in weights}


def optimizer_state(model, optimizer, accelerator):
    """The optimizer state for a checkpoint: under FSDP2 the unsharded state keyed by parameter name, on the main
    process (``get_optimizer_state_dict``); None under DeepSpeed (ZeRO keeps it in its own partitioned format)."""
    strategy = strategy_of(accelerator)
    if strategy == "deepspeed":
        return None
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(accelerator.unwrap_model(model), optimizer.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model, optimizer, accelerator, state) -> None:
    if strategy_of(accelerator) == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # Every process reads the same file, so each takes its own shard of the full state.
        set_optimizer_state_dict(accelerator.unwrap_model(model), optimizer.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def refuse_deepspeed_resume(folder: Path, strategy: str) -> None:
    """Before anything trains: a DeepSpeed checkpoint holds the adapter, not the optimizer state."""
    if strategy == "deepspeed":
        raise LorafitError(
            f"cannot resume from {folder}: it was written by a DeepSpeed run and holds the adapter but not the "
            "optimizer state",
            why="ZeRO partitions the optimizer state in DeepSpeed's own format, which lorafit does not save (it "
            "would need pickle); resuming without it would not continue the same run",
            fix="train resumable runs with distributed.strategy: ddp or fsdp; to continue from this adapter, "
            "start a new run from it",
        )


def unshard_for_outputs(model, accelerator) -> None:
    """After the last step, give every process the whole (adapter and base) weights back, for what the recipe
    does with the trained model: the frozen-weights check, generation, the best-adapter restore and the artifact.

    Under FSDP2 the parameters are DTensor shards; ``unshard`` all-gathers them into plain tensors. Under ZeRO-3
    DeepSpeed gathers them while its context is open; it is left open, as nothing trains after this point. This
    costs one full copy of the model per process at the end of the run: the same as DDP holds throughout."""
    strategy = strategy_of(accelerator)
    if strategy == "fsdp":
        from torch.distributed.fsdp import FSDPModule

        for module in accelerator.unwrap_model(model).modules():
            if isinstance(module, FSDPModule):
                module.unshard()
    elif strategy == "deepspeed" and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        deepspeed.zero.GatheredParameters(list(model.parameters())).__enter__()


def check_strategy_can_run(config: Config) -> None:
    """Before Trainer is built: FSDP and DeepSpeed need CUDA GPUs and a launcher (transformers raises a bare
    ValueError without a launcher; accelerate silently drops them on a CPU, see require_strategy_active)."""
    wanted = config.distributed.strategy
    if wanted == "ddp":
        return
    if not torch.cuda.is_available():
        _refuse_strategy(wanted, "on a CPU")
    if "WORLD_SIZE" not in os.environ:
        _refuse_strategy(wanted, "without a launcher")


def require_strategy_active(config: Config, accelerator) -> None:
    """Refuse a run in which accelerate dropped the asked-for strategy. accelerate applies FSDP and DeepSpeed only
    to processes on GPUs started by a launcher; elsewhere it trains without them and says nothing (measured with
    accelerate 1.15: an fsdp run of 2 CPU processes trained with plain DDP)."""
    wanted, active = config.distributed.strategy, strategy_of(accelerator)
    if wanted == "fsdp" and active != "fsdp" or wanted.startswith("deepspeed") and active != "deepspeed":
        _refuse_strategy(wanted, f"accelerate set up {'one process' if active == 'single' else active}")


def _refuse_strategy(wanted: str, where: str):
    raise LorafitError(
        f"distributed.strategy: {wanted} is not possible in this run ({where})",
        why="accelerate applies FSDP and DeepSpeed only to processes on CUDA GPUs started by a launcher; otherwise "
        "it trains without them, and the run would not be the one the config asks for",
        fix="run on CUDA GPUs with lorafit train CONFIG --nproc N (--nproc 1 for one GPU), or set "
        "distributed.strategy: ddp",
    )
